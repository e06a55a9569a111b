"""Container VMs are unprivileged sandboxes, tried as a user would: a real server, the lobby and ``ssh vm@host``
with OpenSSH. Private id ranges and keyrings, the seccomp filter, dev tools under it, symlink traps against every
lobby command that touches a disk, bounded /dev/shm and the OOM killer, space given back, the VM's own limits."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ussycode.runtime import idmap, lxcfs
from ussycode.runtime.container import ContainerRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


async def _new(server, key: Path, *args: str) -> dict:
    r = await server.ssh(key, "new", *args, "--json", timeout=180)
    assert r.exit_status == 0, r
    return json.loads(r.stdout)


async def _run(server, key: Path, vm: str, script: str, timeout: float = 120) -> str:
    r = await server.ssh(key, script, user=vm, timeout=timeout)
    assert r.exit_status == 0, (script, r)
    return r.stdout


PY_SYSCALL = """python3 - <<'EOF'
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
for name, nr in (("keyctl", 250), ("add_key", 248), ("bpf", 321), ("perf_event_open", 298),
                 ("io_uring_setup", 425), ("userfaultfd", 323)):
    rc = libc.syscall(nr, 0, 0, 0, 0, 0)
    print(name, rc, errno.errorcode.get(ctypes.get_errno()) if rc == -1 else "-")
EOF"""


async def test_private_id_ranges_keyrings_and_seccomp(server) -> None:
    alice, bob = await server.register("alice"), await server.register("bob")
    await _new(server, alice, "--name=alice-box")
    await _new(server, bob, "--name=bob-box")
    maps = {}
    for key, vm in ((alice, "alice-box"), (bob, "bob-box")):
        for who in ("", "sudo "):  # the user and guest root
            out = (await _run(server, key, vm, f"{who}cat /proc/self/uid_map /proc/self/gid_map")).split()
            assert out[0] == "0" and out[2] == "65536" and out[3:] == out[:3], out
            host_base = int(out[1])
            assert host_base >= idmap.FIRST_HOST_ID
            maps.setdefault(vm, set()).add(host_base)
    assert len(maps["alice-box"]) == len(maps["bob-box"]) == 1
    a, b = maps["alice-box"].pop(), maps["bob-box"].pop()
    assert abs(a - b) >= 65536  # different, non-overlapping ranges
    # The server recorded them.
    recorded = {vm: (await server.app.services.vms.by_name(vm)).id_base for vm in ("alice-box", "bob-box")}
    assert recorded == {"alice-box": a, "bob-box": b}

    # Keyring calls are refused for the user and for guest root; so nothing can be shared through a keyring.
    for who in ("", "sudo "):
        out = await _run(server, alice, "alice-box", who + PY_SYSCALL)
        for line in out.splitlines():
            name, rc, err = line.split()
            assert (rc, err) == ("-1", "EPERM"), line
    status = await _run(server, bob, "bob-box", "grep -E '^(Seccomp|CapBnd|NoNewPrivs):' /proc/self/status")
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t0" in status
    # Nested user namespaces are refused (no full capability set for a guest user).
    r = await server.ssh(bob, "unshare -Ur id", user="bob-box")
    assert r.exit_status != 0 and "Operation not permitted" in r.stderr, r
    # The host sees no key owned by either range.
    with open("/proc/key-users") as f:
        owners = {int(line.split(":")[0]) for line in f if line.strip()}
    assert not {u for u in owners if a <= u < a + 65536 or b <= u < b + 65536}

    # A VM runs below the control plane's priority, sessions and commands included; not even guest root can
    # raise it.
    assert (await _run(server, bob, "bob-box", "nice")).strip() == "10"
    r = await server.ssh(bob, "sudo renice -n 0 -p $$", user="bob-box")
    assert r.exit_status != 0 and "Permission denied" in r.stderr, r
    init_pid = (await server.app.services.vms.by_name("bob-box")).runtime_state["pid"]
    assert os.getpriority(os.PRIO_PROCESS, init_pid) == 10

    # A file guest root makes is owned by the VM's range on the host, not by host root.
    await _run(server, alice, "alice-box", "sudo touch /root-made && sudo chown 0:0 /root-made")
    vm = await server.app.services.vms.by_name("alice-box")
    st = os.stat(f"/proc/{vm.runtime_state['pid']}/root/root-made")
    assert (st.st_uid, st.st_gid) == (a, a)


def _deb(tmp: Path) -> bytes:
    pkg = tmp / "ussy-hello"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/bin").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: ussy-hello\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: test <t@example.invalid>\nDescription: test package\n")
    (pkg / "usr/bin/ussy-hello").write_text("#!/bin/sh\necho hello from a package\n")
    (pkg / "usr/bin/ussy-hello").chmod(0o755)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(tmp / "h.deb")], check=True,
                   capture_output=True)
    return (tmp / "h.deb").read_bytes()


async def test_dev_tools_work_under_the_filter(server, tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    key = await server.register("dev")
    await _new(server, key, "--name=devbox")
    r = await server.ssh(key, "cat > /tmp/h.deb", user="devbox", stdin=_deb(tmp_path))
    assert r.exit_status == 0, r
    # apt-get installs a local package (the VMs of the tests have no internet), with its own sandbox user _apt.
    out = await _run(server, key, "devbox", "sudo apt-get install -y -q /tmp/h.deb >/dev/null 2>&1; "
                                            "ussy-hello && dpkg -s ussy-hello | grep Status")
    assert "hello from a package" in out and "install ok installed" in out
    out = await _run(server, key, "devbox", "sudo dpkg -r ussy-hello >/dev/null && echo removed")
    assert "removed" in out
    # A Python virtual environment (the test image has no ensurepip: --without-pip).
    out = await _run(server, key, "devbox", "python3 -m venv --without-pip /tmp/venv && "
                                            "/tmp/venv/bin/python -c 'import sys; print(sys.prefix)'")
    assert out.strip() == "/tmp/venv"
    # ptrace of one's own process (what strace and gdb do), and git-like tools' fork/exec/pipes.
    out = await _run(server, key, "devbox", """python3 - <<'EOF'
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
child = os.fork()
if child == 0:
    time.sleep(5)
    os._exit(0)
rc = libc.ptrace(16, child, None, None)  # PTRACE_ATTACH
os.waitpid(child, 0)
print("attach", rc, ctypes.get_errno())
os.kill(child, signal.SIGKILL)
EOF""")
    assert out.split()[:2] == ["attach", "0"], out


def _probe_state(probe: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(probe.rglob("*")):
        st = path.lstat()
        h.update(f"{path.relative_to(probe)} {st.st_mode} {st.st_uid} {st.st_size} {st.st_mtime_ns}\n".encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


async def test_symlink_traps_change_nothing_outside_the_vm(server) -> None:
    probe = Path(tempfile.mkdtemp(prefix="ussy-probe-", dir="/var/tmp"))
    try:
        for name in ("ssh_host_ed25519_key", "ssh_host_ecdsa_key", "authorized_keys", "ussycode.sh", "canary"):
            (probe / name).write_text(f"host file {name}\n")
        (probe / "sub").mkdir()
        before = _probe_state(probe)
        key = await server.register("trap")
        await _new(server, key, "--name=trapbox")
        # Every path the host used to touch now points at the host's probe directory (its absolute path), with
        # the guest's own copy of the real contents there so the VM keeps working.
        p = str(probe)
        await _run(server, key, "trapbox", f"""sudo sh -e -c '
mkdir -p {p}
cp -a /etc/ssh/. {p}/
rm -rf /etc/ssh && ln -s {p} /etc/ssh
cp -a /etc/profile.d/. {p}/ 2>/dev/null || true
rm -rf /etc/profile.d && ln -s {p} /etc/profile.d
cp -a /home/ussycode/.ssh/. {p}/ && chown -R 1000:1000 {p}
rm -rf /home/ussycode/.ssh && ln -s {p} /home/ussycode/.ssh
ln -s {p}/canary /etc/passwd.trap
ln -sf ../../../../../../{p} /etc/resolv.conf.d 2>/dev/null || true
(rmdir /run || mv /run /run.old || true) 2>/dev/null
'""")
        assert _probe_state(probe) == before
        for argv in (("cp", "trapbox", "trapcopy"), ("restart", "trapbox"), ("rename", "trapbox", "trapbox2"),
                     ("stop", "trapbox2"), ("start", "trapbox2"), ("restart", "trapcopy")):
            r = await server.ssh(key, *argv, timeout=180)
            assert r.exit_status == 0, (argv, r)
            assert _probe_state(probe) == before, argv
        # Both machines still run (their sshd refuses the guest's own broken ~/.ssh now: StrictModes), and the
        # copy made its own host keys, inside the guest. The host's exec reads /etc/passwd through guestfs.
        fingerprints = set()
        for name in ("trapbox2", "trapcopy"):
            vm = await server.app.services.vms.by_name(name)
            res = await server.app.services.vms.runtime.exec(
                vm.id, ["sh", "-c", f"readlink /etc/ssh; id -un; ssh-keygen -lf {p}/ssh_host_ed25519_key.pub"])
            lines = res.stdout.decode().split("\n")
            assert lines[:2] == [p, "ussycode"], res
            fingerprints.add(lines[2])
        assert len(fingerprints) == 2
        for name in ("trapbox2", "trapcopy"):
            r = await server.ssh(key, "rm", name, "--yes", timeout=180)
            assert r.exit_status == 0, r
            assert _probe_state(probe) == before
    finally:
        shutil.rmtree(probe, ignore_errors=True)


async def test_shm_is_bounded_and_a_runaway_dies_not_the_vm(server) -> None:
    key = await server.register("oom")
    await _new(server, key, "--name=oombox", "--memory=256")
    pid_before = (await server.app.services.vms.by_name("oombox")).runtime_state["pid"]
    r = await server.ssh(key, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=1000", user="oombox")
    assert r.exit_status != 0 and "No space left on device" in r.stderr, r  # /dev/shm is half the memory
    out = await _run(server, key, "oombox", "du -m /dev/shm/fill; rm /dev/shm/fill; df -m /run | tail -1")
    assert int(out.split()[0]) <= 128, out
    # A process that wants more than the VM has is killed; the VM (its init, its sshd) is not.
    r = await server.ssh(key, "python3 -c 'b = bytearray(600 * 2**20); b[::4096] = b\"x\" * len(b[::4096])'",
                         user="oombox", timeout=120)
    assert r.exit_status != 0
    out = await _run(server, key, "oombox", "cat /proc/1/oom_score_adj /proc/self/oom_score_adj; echo alive")
    init_adj, own_adj, alive = out.split()
    assert alive == "alive" and int(init_adj) < int(own_adj)
    assert (await server.app.services.vms.by_name("oombox")).runtime_state["pid"] == pid_before


async def test_deleted_data_gives_host_space_back(server) -> None:
    key = await server.register("space")
    await _new(server, key, "--name=spacebox", "--disk=3")
    vm = await server.app.services.vms.by_name("spacebox")
    disk = Path(vm.runtime_state["disk"])

    def allocated() -> int:
        return os.stat(disk).st_blocks * 512

    start = allocated()
    await _run(server, key, "spacebox", "dd if=/dev/zero of=big bs=1M count=2048 status=none && sync", timeout=300)
    full = allocated()
    assert full - start >= 1900 * 2**20
    await _run(server, key, "spacebox", "rm big && sync")
    # ext4 discards freed blocks after its journal commits, and the loop device punches the holes: soon, not now.
    deadline = asyncio.get_running_loop().time() + 60
    while (freed := allocated()) - start >= 100 * 2**20 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.5)
    assert freed - start < 100 * 2**20, (start, full, freed)
    r = await server.ssh(key, "rm", "spacebox", "--yes", timeout=180)
    assert r.exit_status == 0 and not disk.exists()


async def test_vm_sees_its_own_limits(server) -> None:
    if not lxcfs.status().ok and shutil.which("lxcfs") is None:
        pytest.skip("lxcfs is not installed (apt-get install lxcfs)")
    key = await server.register("limits")
    await _new(server, key, "--name=limitbox", "--cpu=1", "--memory=512", "--disk=2")
    for who in ("", "sudo "):
        out = await _run(server, key, "limitbox",
                         f"{who}sh -c 'nproc; free -m | awk \"/^Mem:/{{print \\$2}}\"; cut -d. -f1 /proc/uptime; "
                         "grep -c ^processor /proc/cpuinfo; grep -c ^cpu[0-9] /proc/stat; "
                         "df -BM --output=size / | tail -1'")
        nproc, mem, up, cpuinfo, stat_cpus, disk = out.split()
        assert nproc == "1" and cpuinfo == "1" and stat_cpus == "1", out
        assert 480 <= int(mem) <= 512, out
        assert int(up) < 120, out  # the VM's uptime, not the host's
        assert 1800 <= int(disk.rstrip("M")) <= 2048, out
    out = await _run(server, key, "limitbox", "uptime")
    assert "up 0 min" in out or "up 1 min" in out or "up 2 min" in out, out


async def test_compilers_node_git_and_venv_in_the_full_image(server) -> None:
    from ussycode.runtime.images import ImageStore

    try:
        ImageStore(server.app.settings.images_dir).resolve("ussyuntu")
    except Exception:  # noqa: BLE001 - the full image takes minutes to build: only where it exists
        pytest.skip("the full image is not built here (ussycode image build --name ussyuntu)")
    key = await server.register("full")
    await _new(server, key, "--name=fullbox", "--image=ussyuntu", "--memory=1024")
    out = await _run(server, key, "fullbox", """set -e
cd /tmp
printf '#include <stdio.h>\\nint main(void){puts("built by gcc");return 0;}\\n' > h.c
gcc -O2 -o h h.c && ./h
mkdir -p lib app && (cd lib && npm init -y >/dev/null && echo 'module.exports = 42' > index.js)
cd app && npm init -y >/dev/null && npm install --offline --no-audit --no-fund ../lib >/dev/null 2>&1
node -e 'console.log("node says", require("lib"))'
cd /tmp && python3 -m venv v && v/bin/pip --version | cut -d' ' -f1
git init -q repo && cd repo && git -c user.email=a@b -c user.name=a commit -q --allow-empty -m one
git log --oneline | wc -l
""", timeout=300)
    assert out.split("\n")[:4] == ["built by gcc", "node says 42", "pip", "1"], out


async def test_the_shared_image_cannot_be_changed_through_a_vm_mount(server) -> None:
    """The image a VM's overlay reads sits id-mapped under the VM's run directory: that mount is read-only, so
    nothing that walks the directory (a removal while the VM runs, a cleanup of a stray run dir) can change or
    delete the image every other VM uses."""
    key = await server.register("imgguard")
    vm = await _new(server, key, "--name=guarded")
    runtime = server.app.services.vms.runtime
    row = await server.app.services.vms.by_name(vm["name"])
    lower = runtime._vm_dir(row.id) / "lower-map"  # noqa: SLF001 - the mount under test
    image_file = lower / "etc" / "os-release"
    assert image_file.exists()
    for attempt in (lambda: (lower / "etc" / "planted").write_text("x"), image_file.unlink,
                    lambda: (lower / "usr" / "lib").rename(lower / "usr" / "moved")):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS
    # a removal of the whole run directory while the VM runs leaves the image alone
    source = next(line.split()[3] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(lower))
    assert (Path(source) / "etc" / "os-release").exists()
    shutil.rmtree(runtime._vm_dir(row.id), ignore_errors=True)  # noqa: SLF001
    assert (Path(source) / "etc" / "os-release").exists() and (Path(source) / "usr" / "bin").is_dir()

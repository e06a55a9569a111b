"""Every runtime keeps the guest contract of :mod:`ussycode.runtime.base`, proven on real VMs.

VMs are shared per module where a test does not disturb them (booting is the slow part); tests that stop,
fill or destroy a VM use their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from ussycode.errors import RuntimeFailure, StateError
from ussycode.runtime import idmap
from ussycode.runtime.base import Runtime
from ussycode.runtime.images import ImageStore
from ussycode.types import VmSpec, VmStatus

from .conftest import make_test_runtime

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ENV_VALUE = "it's \"quoted\" $HOME `x` \\ done"
MakeVm = Callable[..., Awaitable[VmSpec]]


def _client_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


CLIENT_KEY = _client_key()


def is_container(runtime: Runtime) -> bool:
    """Container VMs share the host kernel; the other runtimes boot their own (qemu, firecracker)."""
    return runtime.name == "container"


def fresh_id_base() -> int:
    """A private id range for a test VM (the server allocates them; tests draw from the top slots)."""
    return idmap.base_of_slot(idmap.MAX_SLOTS - 1 - secrets.randbelow(20000))


def new_spec(name: str, *, memory_mb: int = 256, disk_gb: int = 1, image: str = "ussyuntu-mini") -> VmSpec:
    return VmSpec(
        id=uuid.uuid4().hex, name=name, image=image, cpu=1, memory_mb=memory_mb, disk_gb=disk_gb,
        env={"USSYCODE_VM_NAME": name, "FOO": ENV_VALUE},
        authorized_keys=(CLIENT_KEY.export_public_key().decode().strip(),), id_base=fresh_id_base(),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_vm(runtime: Runtime, runtime_workdir: Path) -> AsyncIterator[MakeVm]:
    """Create + start VMs; every VM made here is destroyed at the end of the module."""
    made: list[str] = []

    async def make(name: str, *, start: bool = True, **kw: int) -> VmSpec:
        spec = new_spec(name, **kw)
        made.append(spec.id)
        await runtime.create(spec)
        if start:
            await runtime.start(spec)
        return spec

    yield make
    for vm_id in made:
        with contextlib.suppress(Exception):
            await runtime.destroy(vm_id)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm_a(make_vm: MakeVm) -> VmSpec:
    return await make_vm("vm-a")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm_b(make_vm: MakeVm) -> VmSpec:
    return await make_vm("vm-b")


async def sh(runtime: Runtime, vm: VmSpec, script: str, *, user: str = "ussycode", timeout: float = 60) -> str:
    """Run a bash script in the VM; assert it succeeded; return stdout."""
    result = await runtime.exec(vm.id, ["bash", "-c", script], user=user, timeout=timeout)
    assert result.exit_status == 0, (script, result)
    return result.stdout.decode()


CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('CONNECTED')"


async def can_connect(runtime: Runtime, vm: VmSpec, host: str, port: int) -> bool:
    result = await runtime.exec(vm.id, ["python3", "-c", CONNECT, host, str(port)], timeout=30)
    return result.exit_status == 0 and b"CONNECTED" in result.stdout


def disk_file(runtime: Runtime, vm_id: str) -> Path:
    """Where the runtime keeps the VM's disk on the host."""
    if is_container(runtime):
        return Path(runtime.disks_dir) / f"{vm_id}.ext4"  # type: ignore[attr-defined]
    vm_dir: Path = runtime.paths(vm_id).vm_dir  # type: ignore[attr-defined]
    return vm_dir / ("disk.raw" if runtime.name == "firecracker" else "disk.qcow2")


def disks_root(runtime: Runtime) -> Path:
    """The file system the runtime's disks live on (what a full guest disk must not fill)."""
    return Path(runtime.disks_dir if is_container(runtime) else runtime.data_dir)  # type: ignore[attr-defined]


def run_files(runtime: Runtime, vm_id: str) -> Path:
    """The VM's per-boot host state (mounts, sockets, pidfiles)."""
    if is_container(runtime):
        return Path(runtime.run_dir) / vm_id  # type: ignore[attr-defined]
    return Path(runtime.paths(vm_id).run_dir)  # type: ignore[attr-defined]


def host_ipv4() -> str | None:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    for link in json.loads(out):
        if "LOOPBACK" in link.get("flags", []):
            continue
        for info in link.get("addr_info", []):
            if info.get("local"):
                return str(info["local"])
    return None


# --- boot, exec, guest contract ------------------------------------------------------------------------


async def test_sshd_answers_through_open_connection(runtime: Runtime, vm_a: VmSpec) -> None:
    assert await runtime.status(vm_a.id) == VmStatus.RUNNING
    reader, writer = await runtime.open_connection(vm_a.id, 22)
    try:
        banner = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert banner.startswith(b"SSH-2.0-OpenSSH")


async def test_start_is_idempotent(runtime: Runtime, vm_a: VmSpec) -> None:
    before = runtime.get_state(vm_a.id)
    await runtime.start(vm_a)
    assert runtime.get_state(vm_a.id) == before


async def test_exec_runs_as_ussycode_with_passwordless_sudo(runtime: Runtime, vm_a: VmSpec) -> None:
    out = await sh(runtime, vm_a, "id -u; id -un; echo $HOME; sudo -n id -u; hostname")
    assert out.split() == ["1000", "ussycode", "/home/ussycode", "0", "vm-a"]
    root = await runtime.exec(vm_a.id, ["id", "-u"], user="root")
    assert root.stdout.strip() == b"0"
    echo = await runtime.exec(vm_a.id, ["cat"], stdin=b"through stdin")
    assert echo.stdout == b"through stdin"
    assert (await runtime.exec(vm_a.id, ["false"])).exit_status == 1


async def test_root_in_guest_can_install_packages(runtime: Runtime, vm_a: VmSpec) -> None:
    """What `apt-get install` does to the system (dpkg as root via sudo) works without network."""
    out = await sh(
        runtime, vm_a,
        "set -e; d=$(mktemp -d); mkdir -p $d/pkg/DEBIAN $d/pkg/usr/share/ussy-probe;"
        "echo hi > $d/pkg/usr/share/ussy-probe/hi;"
        "printf 'Package: ussy-probe\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@example.invalid>\\n"
        "Description: probe\\n' > $d/pkg/DEBIAN/control; dpkg-deb -b $d/pkg $d/probe.deb >/dev/null;"
        "sudo dpkg -i $d/probe.deb >/dev/null; cat /usr/share/ussy-probe/hi; dpkg -s ussy-probe | grep Status;"
        "sudo dpkg -r ussy-probe >/dev/null; test ! -e /usr/share/ussy-probe/hi && echo removed",
    )
    assert "hi" in out and "install ok installed" in out and "removed" in out


async def test_env_and_authorized_keys_are_installed(runtime: Runtime, vm_a: VmSpec) -> None:
    out = await runtime.exec(vm_a.id, ["bash", "-lc", 'printf %s "$FOO"'])
    assert out.stdout.decode() == ENV_VALUE
    assert (await sh(runtime, vm_a, 'bash -lc "echo \\$USSYCODE_VM_NAME"')).strip() == "vm-a"
    stat = await sh(runtime, vm_a, "stat -c '%a %u %g' ~/.ssh/authorized_keys ~/.ssh")
    assert stat.split("\n")[:2] == ["600 1000 1000", "700 1000 1000"]


async def _ssh(runtime: Runtime, vm: VmSpec, username: str = "ussycode") -> asyncssh.SSHClientConnection:
    sock = await runtime.open_socket(vm.id, 22)
    return await asyncssh.connect(
        sock=sock, username=username, client_keys=[CLIENT_KEY], known_hosts=None, agent_path=None,
        config=[], preferred_auth="publickey",
    )


async def test_real_ssh_login_with_the_authorized_key(runtime: Runtime, vm_a: VmSpec) -> None:
    async with await _ssh(runtime, vm_a) as conn:
        # Environment from the spec reaches login shells (an interactive session is one).
        result = await conn.run("whoami; bash -lc 'echo \"$FOO\"'", check=True)
        assert result.stdout == f"ussycode\n{ENV_VALUE}\n"
        pty = await conn.run("tty", term_type="xterm", check=True)
        assert str(pty.stdout).startswith("/dev/pts/")
    with pytest.raises(asyncssh.PermissionDenied):
        await _ssh(runtime, vm_a, username="root")


async def test_every_vm_has_its_own_host_keys(runtime: Runtime, vm_a: VmSpec, vm_b: VmSpec) -> None:
    cmd = "cat /etc/ssh/ssh_host_ed25519_key.pub"
    assert await sh(runtime, vm_a, cmd) != await sh(runtime, vm_b, cmd)


# --- isolation -----------------------------------------------------------------------------------------------


async def test_guest_root_has_no_dangerous_capabilities(runtime: Runtime, vm_a: VmSpec) -> None:
    if not is_container(runtime):
        pytest.skip(
            f"{runtime.name} guests run their own kernel, where root may hold every capability; their confinement "
            "is the hypervisor plus the namespace firewall (test_guest_root_is_confined_to_its_own_kernel and the "
            "reachability tests)"
        )
    for script in (
        "sudo -n ip link set lo down",  # CAP_NET_ADMIN: the firewall and routes are the host's
        "sudo -n mount -t tmpfs none /mnt",  # CAP_SYS_ADMIN
        "sudo -n mknod /tmp/hostdisk b 8 0",  # CAP_MKNOD: no host block devices
        "sudo -n sh -c 'echo 1 > /proc/sys/vm/drop_caches'",  # /proc/sys is read-only
        "sudo -n python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)'",  # CAP_NET_RAW
    ):
        result = await runtime.exec(vm_a.id, ["bash", "-c", script])
        assert result.exit_status != 0, script
    caps = await sh(runtime, vm_a, "sudo -n grep CapBnd /proc/self/status")
    bnd = int(caps.split()[1], 16)
    for cap in (21, 12, 16, 19, 17, 2, 22, 25, 27, 13):  # SYS_ADMIN NET_ADMIN SYS_MODULE SYS_PTRACE ...
        assert not bnd & (1 << cap), cap


async def test_guest_root_is_confined_to_its_own_kernel(runtime: Runtime, vm_a: VmSpec) -> None:
    """In a real VM, root rules a kernel of its own: not the host's, seeing only the VM's own disks and network."""
    if is_container(runtime):
        pytest.skip("container guests share the host kernel: test_guest_root_has_no_dangerous_capabilities covers them")
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert (await sh(runtime, vm_a, "cat /proc/sys/kernel/random/boot_id")).strip() != host_boot_id
    # Root holds every capability in there (it may load modules, reconfigure its network, raw sockets)…
    bnd = int((await sh(runtime, vm_a, "sudo -n grep CapBnd /proc/self/status")).split()[1], 16)
    assert bnd & (1 << 21) and bnd & (1 << 12) and bnd & (1 << 13)  # SYS_ADMIN NET_ADMIN NET_RAW
    # …yet the only block devices it can see are the two this VM was given (root disk, config drive).
    disks = await sh(
        runtime, vm_a, 'for d in /sys/block/*; do case ${d##*/} in loop*|ram*|zram*) continue;; esac; '
        'echo "${d##*/} $(cat $d/serial 2>/dev/null || echo no-serial)"; done', user="root",
    )
    assert sorted(line.split()[-1] for line in disks.splitlines()) == ["ussycfg", "ussyroot"], disks
    # And root cannot reach a host listener either (the reachability tests use the unprivileged user).
    server = await asyncio.start_server(lambda r, w: w.close(), host_ipv4() or "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        probe = await runtime.exec(vm_a.id, ["python3", "-c", CONNECT, host, str(port)], user="root", timeout=30)
        assert b"CONNECTED" not in probe.stdout
    finally:
        server.close()
        await server.wait_closed()


async def test_vm_cannot_reach_host_ports(runtime: Runtime, vm_a: VmSpec) -> None:
    # 10.0.2.2 is the user-mode network's gateway (QEMU's slirp, slirp4netns): it must not lead to the host's
    # loopback (for QEMU it is the loopback of the VM's own network namespace, where nothing listens).
    targets = ["127.0.0.1"] + ([ip] if (ip := host_ipv4()) else [])
    listeners = []
    accepted: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(str(writer.get_extra_info("peername")))
        writer.close()

    try:
        for host in targets:
            server = await asyncio.start_server(on_connect, host, 0)
            listeners.append(server)
            port = server.sockets[0].getsockname()[1]
            # The listener works from the host…
            _, w = await asyncio.open_connection(host, port)
            w.close()
            await asyncio.sleep(0.05)
            accepted.clear()
            # …but not from the VM.
            assert not await can_connect(runtime, vm_a, host, port), host
            if host == "127.0.0.1":
                assert not await can_connect(runtime, vm_a, "10.0.2.2", port)
        assert accepted == []
        assert await can_connect(runtime, vm_a, "127.0.0.1", 22)  # the probe itself works
    finally:
        for server in listeners:
            server.close()
            await server.wait_closed()


async def test_vms_cannot_reach_each_other(runtime: Runtime, vm_a: VmSpec, vm_b: VmSpec) -> None:
    # B serves a port; A tries every address it could name, and the host cannot reach it either.
    # Wait until it listens: python starts slowly in an emulated (TCG) guest on a busy host.
    await runtime.exec(
        vm_b.id,
        ["bash", "-c", "nohup python3 -m http.server 7777 >/dev/null 2>&1 & "
         "for i in $(seq 150); do (: >/dev/tcp/127.0.0.1/7777) 2>/dev/null && break; sleep 0.2; done"],
        timeout=60,
    )
    assert await can_connect(runtime, vm_b, "127.0.0.1", 7777)
    addrs = (await sh(runtime, vm_b, "hostname -I || true")).split()
    for host in ["127.0.0.1", *addrs, *([ip] if (ip := host_ipv4()) else [])]:
        assert not await can_connect(runtime, vm_a, host, 7777), host
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 7777), timeout=1).close()


async def test_vm_cannot_see_other_processes(runtime: Runtime, vm_a: VmSpec, vm_b: VmSpec) -> None:
    await runtime.exec(vm_b.id, ["bash", "-c", "nohup sleep 4242 >/dev/null 2>&1 &"], timeout=10)
    assert "sleep 4242" in await sh(runtime, vm_b, "ps -eo args")
    seen = await sh(runtime, vm_a, "ps -eo pid,args")
    assert "sleep 4242" not in seen
    assert "pytest" not in seen
    assert seen.splitlines()[1].split()[0] == "1"


# --- limits -------------------------------------------------------------------------------------------------


async def test_memory_limit_kills_the_hog_not_the_vm(runtime: Runtime, vm_a: VmSpec) -> None:
    # 600 MB in 16 MB steps: more than the limit (a cgroup, or a VM's RAM), each step small enough for a kernel's
    # overcommit heuristic, so the hog is killed by the OOM killer instead of failing one huge malloc.
    # Faulting in a VM's RAM page by page is slow under TCG (12-20 s alone, minutes with other guests on 2 cores).
    hog = await runtime.exec(
        vm_a.id, ["python3", "-c", "x = [b'x' * 2**24 for _ in range(38)]; print('survived')"],
        timeout=90 if is_container(runtime) else 300,
    )
    assert hog.exit_status == 128 + 9, hog
    assert b"survived" not in hog.stdout
    reader, writer = await runtime.open_connection(vm_a.id, 22)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-")
    writer.close()
    assert (await sh(runtime, vm_a, "echo alive")).strip() == "alive"


async def test_disk_limit_is_enforced_inside_only(runtime: Runtime, make_vm: MakeVm) -> None:
    vm = await make_vm("vm-disk", disk_gb=1)
    # Free space is read after a sync: until then the host file system's delayed-allocation reservations for the
    # disk's dirty pages over-count what the writes will really take.
    await asyncio.to_thread(os.sync)
    free_before = shutil.disk_usage(disks_root(runtime)).free
    fill = await runtime.exec(
        vm.id, ["dd", "if=/dev/zero", "of=/home/ussycode/fill", "bs=1M", "count=1400"], timeout=120
    )
    assert fill.exit_status != 0
    assert b"No space left on device" in fill.stderr
    await asyncio.to_thread(os.sync)
    used = await runtime.disk_usage(vm.id)
    assert used <= 2**30
    assert free_before - shutil.disk_usage(disks_root(runtime)).free < 1.1 * 2**30
    await sh(runtime, vm, "rm -f ~/fill; echo ok")


# --- persistence ----------------------------------------------------------------------------------------


async def test_files_survive_stop_and_start(runtime: Runtime, make_vm: MakeVm) -> None:
    vm = await make_vm("vm-persist")
    keys_before = await sh(runtime, vm, "cat /etc/ssh/ssh_host_ed25519_key.pub")
    await sh(runtime, vm, "echo kept > ~/note; sudo -n sh -c 'echo system > /etc/ussy-note'")
    await runtime.stop(vm.id)
    await runtime.stop(vm.id)  # idempotent
    assert await runtime.status(vm.id) == VmStatus.STOPPED
    with pytest.raises(StateError):
        await runtime.exec(vm.id, ["true"])
    await runtime.start(vm)
    assert await sh(runtime, vm, "cat ~/note /etc/ussy-note") == "kept\nsystem\n"
    assert await sh(runtime, vm, "cat /etc/ssh/ssh_host_ed25519_key.pub") == keys_before


async def test_server_restart_reattaches_without_restarting(
    runtime: Runtime, vm_a: VmSpec, runtime_workdir: Path, image_store: ImageStore
) -> None:
    await sh(runtime, vm_a, "echo before-restart > ~/restart-note")
    uptime = await sh(runtime, vm_a, "cat /proc/1/stat | cut -d' ' -f22")
    state = json.loads(json.dumps(runtime.get_state(vm_a.id)))  # what the core stores in the DB
    fresh = make_test_runtime(runtime.name, runtime_workdir, image_store)
    try:
        await fresh.load_state(vm_a.id, state)
        assert await fresh.status(vm_a.id) == VmStatus.RUNNING
        assert await sh(fresh, vm_a, "cat ~/restart-note") == "before-restart\n"
        assert await sh(fresh, vm_a, "cat /proc/1/stat | cut -d' ' -f22") == uptime  # same init: never restarted
        reader, writer = await fresh.open_connection(vm_a.id, 22)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-")
        writer.close()
    finally:
        await fresh.close()


async def test_dead_vm_reads_as_stopped_after_restart(
    runtime: Runtime, make_vm: MakeVm, runtime_workdir: Path, image_store: ImageStore
) -> None:
    vm = await make_vm("vm-dies")
    state = runtime.get_state(vm.id)
    if "pid" not in state:
        pytest.skip("runtime keeps no pid")
    os.kill(state["pid"], 9)
    for _ in range(100):  # SIGKILL is delivered asynchronously
        stat = Path(f"/proc/{state['pid']}/stat")
        if not stat.exists() or ") Z " in stat.read_text():
            break
        await asyncio.sleep(0.05)
    fresh = make_test_runtime(runtime.name, runtime_workdir, image_store)
    try:
        await fresh.load_state(vm.id, state)
        assert await fresh.status(vm.id) == VmStatus.STOPPED
        await fresh.start(vm)  # and it boots again, from a clean slate
        assert await fresh.status(vm.id) == VmStatus.RUNNING
        await fresh.destroy(vm.id)
    finally:
        await fresh.close()


async def test_copy_disk_is_independent(runtime: Runtime, make_vm: MakeVm) -> None:
    src = await make_vm("vm-src")
    await sh(runtime, src, "echo original > ~/shared")
    src_key = await sh(runtime, src, "cat /etc/ssh/ssh_host_ed25519_key.pub")
    await runtime.stop(src.id)  # the contract: the source is stopped (a runtime may also copy a running one)
    dst = new_spec("vm-dst")
    await runtime.copy_disk(src.id, dst)
    try:
        await runtime.start(src)
        await runtime.start(dst)
        assert await sh(runtime, dst, "cat ~/shared") == "original\n"
        await sh(runtime, dst, "echo changed > ~/shared; echo new > ~/only-in-copy")
        assert await sh(runtime, src, "cat ~/shared; ls ~") == "original\nAGENTS.md\nshared\n"
        assert await sh(runtime, dst, "cat /etc/ssh/ssh_host_ed25519_key.pub") != src_key
    finally:
        await runtime.destroy(dst.id)


# --- cleanup ---------------------------------------------------------------------------------------------


def _processes_mentioning(*words: str) -> list[str]:
    """Command lines of live host processes naming any of ``words`` (a VMM, its egress helper)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if ") Z " in (proc / "stat").read_text():
                continue
        except OSError:
            continue
        if any(w.encode() in cmdline for w in words):
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def _leftovers(runtime: Runtime, vm_id: str) -> list[str]:
    """Host resources a VM could leak (empty list when clean)."""
    from ussycode.runtime import netns

    if not is_container(runtime):
        # A VMM runtime: the VMM process, its netns and its egress helper, its run files (sockets, pidfiles).
        found = [f"process {p}" for p in _processes_mentioning(vm_id, netns.netns_name(vm_id))]
        if netns.exists(netns.netns_name(vm_id)):
            found.append("netns")
        if run_files(runtime, vm_id).exists():
            found.append("run files")
        return found
    found = []
    state_dir = Path(getattr(runtime, "run_dir", "/nonexistent")) / vm_id
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    if str(state_dir) in mounts:
        found.append("mounts")
    if netns.exists(netns.netns_name(vm_id)):
        found.append("netns")
    if any(Path(f"/sys/fs/cgroup/{c}/ussycode/{vm_id}").exists() for c in ("memory", "cpu", "pids", "")):
        found.append("cgroup")
    if losetup := subprocess.run(
        ["losetup", "-j", str(Path(runtime.disks_dir) / f"{vm_id}.ext4")],  # type: ignore[attr-defined]
        capture_output=True, text=True,
    ).stdout.strip():
        found.append(f"loop {losetup}")
    return found


async def test_destroy_removes_everything(runtime: Runtime, make_vm: MakeVm) -> None:
    vm = await make_vm("vm-gone")
    disk = disk_file(runtime, vm.id)
    assert disk.exists()
    await runtime.destroy(vm.id)
    await runtime.destroy(vm.id)  # idempotent
    assert not disk.exists()
    assert not run_files(runtime, vm.id).exists()
    if not is_container(runtime):
        assert not disk.parent.exists()  # the VM's directory (console log, metadata) goes too
    for _ in range(50):  # the loop device is released asynchronously
        if not _leftovers(runtime, vm.id):
            break
        await asyncio.sleep(0.1)
    assert _leftovers(runtime, vm.id) == []


async def test_failed_start_leaves_nothing_behind(
    runtime: Runtime, make_vm: MakeVm, runtime_workdir: Path, image_store: ImageStore
) -> None:
    impatient = make_test_runtime(runtime.name, runtime_workdir, image_store, boot_timeout=0.0)
    vm = await make_vm("vm-fails", start=False)
    try:
        with pytest.raises(RuntimeFailure) as info:
            await impatient.start(vm)
        # The evidence carries the command line that booted it (the container helper, or the VMM) + console tail.
        if is_container(runtime):
            assert "did not answer" in str(info.value) or "exited" in str(info.value)
            assert "console tail" in info.value.evidence and "nsinit" in info.value.evidence
        else:
            assert "did not boot" in str(info.value)
            vmm = "firecracker" if runtime.name == "firecracker" else "qemu-system-x86_64"
            assert "console tail" in info.value.evidence and vmm in info.value.evidence
        assert await impatient.status(vm.id) == VmStatus.STOPPED
        for _ in range(50):
            if not _leftovers(runtime, vm.id):
                break
            await asyncio.sleep(0.1)
        assert _leftovers(runtime, vm.id) == []
        await runtime.start(vm)  # a later start still works
        assert (await sh(runtime, vm, "echo up")).strip() == "up"
    finally:
        await impatient.close()


SERVER_SCRIPT = """
import asyncio, json, sys, uuid
from pathlib import Path
from ussycode.runtime.images import ImageStore
from ussycode.types import VmSpec

async def main():
    work, images, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if name == "container":
        from ussycode.runtime.container import ContainerRuntime
        rt = ContainerRuntime(work / "disks", work / "run", ImageStore(images))
    else:  # the same construction as conftest.make_test_runtime
        from ussycode.runtime.qemu import QemuRuntime
        rt = QemuRuntime(work, ImageStore(images), run_dir=work / "qemu-run")
    spec = VmSpec(id=uuid.uuid4().hex, name="vm-orphan", image="ussyuntu-mini", cpu=1, memory_mb=256, disk_gb=1,
                  id_base=int(sys.argv[4]))
    await rt.create(spec)
    await rt.start(spec)
    print(json.dumps({"spec_id": spec.id, "state": rt.get_state(spec.id)}))
    await rt.close()

asyncio.run(main())
"""


async def test_vm_outlives_the_server_process(
    runtime: Runtime, runtime_workdir: Path, image_store: ImageStore
) -> None:
    if runtime.name not in ("container", "qemu"):
        pytest.skip(f"the server script builds container and qemu runtimes, not {runtime.name}")
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER_SCRIPT, str(runtime_workdir), str(image_store.images_dir), runtime.name,
        str(fresh_id_base()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    info = json.loads(out)
    vm_id = info["spec_id"]
    try:
        await runtime.load_state(vm_id, info["state"])
        assert await runtime.status(vm_id) == VmStatus.RUNNING
        reader, writer = await runtime.open_connection(vm_id, 22)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-")
        writer.close()
    finally:
        await runtime.destroy(vm_id)

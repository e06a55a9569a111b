"""ContainerRuntime: a VM is a set of namespaces on an overlay whose upper layer lives on the VM's own ext4 disk.

Per VM (``vm_id``)::

    disks_dir/<vm_id>.ext4        sparse ext4 disk of exactly disk_gb GiB: the VM's persistent state
    disks_dir/<vm_id>.json        sidecar: the runtime state (image digest, …), so the disk is self-describing
    run_dir/<vm_id>/disk          the disk, loop-mounted (``discard``: deleted blocks go back to the host)
    run_dir/<vm_id>/lower-map     the image rootfs, id-mapped to the VM's user namespace
    run_dir/<vm_id>/disk-map      the disk, id-mapped the same way (files keep guest ids on disk)
    run_dir/<vm_id>/root          overlay: lower-map (read-only) + disk-map/upper = the VM's /
    run_dir/<vm_id>/meta          authorized_keys and env.sh, bind-mounted read-only into the guest
    run_dir/<vm_id>/console.log   the guest init's output (the tail goes into boot errors)
    netns ussy-<hash>             its network namespace (loopback, nftables rules, slirp4netns egress)
    cgroup ussycode/<vm_id>       memory, CPU and pids limits

The guest's PID 1 (``runtime/guest/init.sh``) is started by :mod:`.nsinit` in its own user namespace (the VM's
private host id range from ``VmSpec.id_base``) and new PID/mount/UTS/IPC/cgroup namespaces, under a seccomp filter,
detached from the server: it keeps running when the server exits, and :meth:`load_state` re-attaches.
The host reads the guest's files only through :mod:`ussycode.runtime.guestfs`; it never writes them (host keys of
a copy, authorized_keys, env and resolv.conf are installed by the guest's init from the read-only meta directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ussycode.errors import NotFound, RuntimeFailure, StateError
from ussycode.runtime import disks, guestfs, lxcfs, netns, proc
from ussycode.runtime.base import ExecResult, HostCheck, Runtime
from ussycode.runtime.cgroups import CgroupLimits, Cgroups, pick_cpus
from ussycode.runtime.container import argv as nsinit
from ussycode.runtime.container import host
from ussycode.runtime.container.argv import BootPaths
from ussycode.runtime.container.guest import authorized_keys_file, env_script, parse_passwd
from ussycode.runtime.container.network import ContainerNetwork
from ussycode.runtime.container.state import VmState, alive, kill, start_time
from ussycode.runtime.container.storage import ContainerDisks
from ussycode.runtime.images import GUEST_DIR, ImageStore
from ussycode.types import VmSpec, VmStatus

log = logging.getLogger(__name__)

GUEST_INIT = GUEST_DIR / "init.sh"
SSH_PORT = 22
LAUNCH_TIMEOUT = 30.0  # the launcher sets up the namespaces and exits; longer than this, it hangs


class ContainerRuntime(ContainerNetwork, ContainerDisks, Runtime):
    """Container VMs on this host. Needs root. See the module docstring for the layout."""

    name = "container"

    def __init__(
        self,
        disks_dir: Path,
        run_dir: Path,
        images: ImageStore,
        *,
        egress: bool = True,
        boot_timeout: float = 30.0,
        python: str = sys.executable,
        lxcfs_dir: Path | None = lxcfs.LXCFS_DIR,
    ) -> None:
        self.disks_dir = Path(disks_dir)
        self.run_dir = Path(run_dir)
        self.images = images
        self.egress = egress and shutil.which("slirp4netns") is not None
        self.boot_timeout = boot_timeout
        self.python = python
        self.lxcfs_dir = lxcfs_dir if lxcfs_dir is not None and shutil.which("lxcfs") else None
        self._states: dict[str, VmState] = {}
        self._env: dict[str, dict[str, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cgroups: Cgroups | None = None
        self._executor: ThreadPoolExecutor | None = None

    # --- host check -----------------------------------------------------------------------------------

    @classmethod
    def check(cls) -> HostCheck:
        return host.host_check()

    # --- paths and state -------------------------------------------------------------------------------

    def _disk(self, vm_id: str) -> Path:
        return self.disks_dir / f"{vm_id}.ext4"

    def _sidecar(self, vm_id: str) -> Path:
        return self.disks_dir / f"{vm_id}.json"

    def _vm_dir(self, vm_id: str) -> Path:
        return self.run_dir / vm_id

    def _console(self, vm_id: str) -> Path:
        return self._vm_dir(vm_id) / "console.log"

    def console_log(self, vm_id: str) -> Path | None:
        return self._console(vm_id)

    @property
    def cgroups(self) -> Cgroups:
        if self._cgroups is None:
            self._cgroups = Cgroups()
        return self._cgroups

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def _save(self, st: VmState) -> None:
        self._states[st.vm_id] = st
        tmp = self._sidecar(st.vm_id).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(st.as_json(), indent=2) + "\n")
        os.replace(tmp, self._sidecar(st.vm_id))

    def _state(self, vm_id: str) -> VmState:
        st = self._states.get(vm_id)
        if st is None:
            try:
                st = VmState.from_json(json.loads(self._sidecar(vm_id).read_text()))
            except FileNotFoundError:
                raise NotFound(f"container VM {vm_id} does not exist on this host") from None
            except ValueError as exc:
                raise RuntimeFailure(f"state of VM {vm_id} is corrupt: {exc}") from exc
            self._states[vm_id] = st
        return st

    def get_state(self, vm_id: str) -> dict[str, Any]:
        return self._state(vm_id).as_json()

    async def list_vms(self) -> list[str]:
        """Every VM with a state sidecar in the disks directory."""
        return sorted(p.stem for p in await asyncio.to_thread(lambda: list(self.disks_dir.glob("*.json"))))

    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None:
        """Re-attach to VM ``vm_id`` from a blob :meth:`get_state` returned (the VM keeps running)."""
        async with self._lock(vm_id):
            st = VmState.from_json(state) if state else self._state(vm_id)
            if st.vm_id != vm_id:
                raise RuntimeFailure(f"state for VM {st.vm_id} handed to VM {vm_id}")
            self._states[vm_id] = st
            if not alive(st.pid, st.pid_start) and st.pid is not None:
                # It died while nobody watched: release what it held so the next start is clean.
                await self._teardown(st)

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def create(self, spec: VmSpec) -> None:
        """Make the VM's disk (sparse ext4 of exactly ``spec.disk_gb`` GiB) and record the image digest."""
        async with self._lock(spec.id):
            if self._sidecar(spec.id).exists() and self._disk(spec.id).exists():
                return
            image = await asyncio.to_thread(self.images.resolve, spec.image)
            self.disks_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(disks.create_disk, self._disk(spec.id), spec.disk_gb)
            try:
                self._save(self._new_state(spec, image.digest))
            except BaseException:
                self._disk(spec.id).unlink(missing_ok=True)
                raise

    def _new_state(self, spec: VmSpec, digest: str) -> VmState:
        return VmState(
            vm_id=spec.id, image=spec.image, digest=digest, disk=str(self._disk(spec.id)),
            netns=netns.netns_name(spec.id), hostname=spec.hostname or spec.name, cpu=spec.cpu,
            memory_mb=spec.memory_mb, disk_gb=spec.disk_gb, id_base=spec.id_base,
        )

    async def start(self, spec: VmSpec) -> None:
        """Boot the VM; return once its sshd answers on port 22. Idempotent while it runs."""
        async with self._lock(spec.id):
            st = self._state(spec.id)
            if alive(st.pid, st.pid_start):
                return
            st.hostname, st.cpu, st.memory_mb = spec.hostname or spec.name, spec.cpu, spec.memory_mb
            if spec.id_base is not None:
                st.id_base = spec.id_base  # the server's record is the truth
            if st.id_base is None:
                raise RuntimeFailure(f"VM {spec.name} has no user id range: the server allocates one "
                                     "(VmSpec.id_base)")
            self._env[spec.id] = dict(spec.env)
            await self._teardown(st)  # leftovers of a crash
            argv: list[str] = []
            try:
                argv = await self._launch(st, spec)
                await self._wait_for_sshd(st, argv)
            except BaseException as exc:
                await self._teardown(st)
                if isinstance(exc, RuntimeFailure):
                    raise
                if isinstance(exc, Exception):
                    raise RuntimeFailure(
                        f"VM {spec.name} failed to start: {exc}", evidence=self._evidence(st, argv)
                    ) from exc
                raise

    def _paths(self, vm_id: str, lower: Path) -> BootPaths:
        vm_dir = self._vm_dir(vm_id)
        return BootPaths(lower=lower, disk=vm_dir / "disk", lower_map=vm_dir / "lower-map",
                         disk_map=vm_dir / "disk-map", root=vm_dir / "root")

    def _lxcfs_files(self, st: VmState) -> tuple[str, ...]:
        if self.lxcfs_dir is None:
            return ()
        try:
            return lxcfs.ensure(self.lxcfs_dir)
        except (RuntimeFailure, OSError, subprocess.SubprocessError) as exc:
            # The VM still works (it sees the host's CPU and memory totals); say why in its console.
            with open(self._console(st.vm_id), "a") as f:
                f.write(f"ussycode: no lxcfs view of this VM's limits: {exc}\n")
            return ()

    async def _launch(self, st: VmState, spec: VmSpec) -> list[str]:
        vm_dir = self._vm_dir(st.vm_id)
        image = self.images.by_digest(st.digest)
        vm_dir.mkdir(parents=True, exist_ok=True)
        paths = self._paths(st.vm_id, image.rootfs)
        disks.overlay_options(paths.lower_map, paths.disk_map / "upper", paths.disk_map / "work")  # validates
        await asyncio.to_thread(self._wait_loop_released, Path(st.disk))
        await asyncio.to_thread(disks.mount_disk, Path(st.disk), paths.disk)
        await asyncio.to_thread(disks.prepare_overlay_dirs, paths.disk)
        await self._setup_netns(st)
        assert st.id_base is not None
        cpus = pick_cpus(st.cpu, os.cpu_count() or 1, st.id_base // st.id_count)
        await asyncio.to_thread(self.cgroups.create, st.vm_id,
                                CgroupLimits(cpu=st.cpu, memory_mb=st.memory_mb, cpus=cpus))
        lxcfs_files = await asyncio.to_thread(self._lxcfs_files, st)
        meta = vm_dir / "meta"
        meta.mkdir(mode=0o755, exist_ok=True)
        (meta / "authorized_keys").write_text(authorized_keys_file(spec.authorized_keys))
        (meta / "env.sh").write_text(env_script(spec.env))
        resolv = meta / "resolv.conf"
        if self.egress:
            resolv.write_text(f"# Written by ussycode at every boot.\nnameserver {netns.SLIRP_DNS_V4}\n")
        else:
            resolv.unlink(missing_ok=True)
        fresh_keys = meta / "fresh-host-keys"
        if st.fresh_host_keys:
            fresh_keys.write_text("This VM is a copy: init makes new SSH host keys.\n")
        else:
            fresh_keys.unlink(missing_ok=True)
        pidfile = vm_dir / "init.pid"
        pidfile.unlink(missing_ok=True)
        argv = nsinit.boot_argv(
            self.python, paths=paths, hostname=st.hostname, netns_path=netns.NETNS_DIR / st.netns,
            init=GUEST_INIT, meta=meta, cgroup_procs=self.cgroups.procs_files(st.vm_id), pidfile=pidfile,
            id_base=st.id_base, id_count=st.id_count, memory_mb=st.memory_mb,
            lxcfs=self.lxcfs_dir if lxcfs_files else None, lxcfs_proc=lxcfs_files,
        )
        with open(self._console(st.vm_id), "wb") as console:  # noqa: ASYNC230 (local, instant)
            launcher = await proc.spawn(
                proc.as_guest_priority(argv), stdin=proc.DEVNULL, stdout=console, stderr=console,
                start_new_session=True, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
            )
            try:
                code = await proc.wait(launcher, LAUNCH_TIMEOUT)
            except BaseException as exc:
                launcher.kill()
                await asyncio.shield(proc.wait(launcher))
                if not isinstance(exc, TimeoutError):
                    raise
                raise RuntimeFailure(f"VM {st.hostname}: the launcher hung",
                                     evidence=self._evidence(st, argv)) from None
        if code != 0 or not pidfile.exists():
            raise RuntimeFailure(
                f"VM {st.hostname} failed to boot (launcher exit {code})", evidence=self._evidence(st, argv)
            )
        st.pid = int(pidfile.read_text())
        st.pid_start = start_time(st.pid)
        self._save(st)
        return argv

    async def _wait_for_sshd(self, st: VmState, argv: list[str]) -> None:
        deadline = time.monotonic() + self.boot_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if not alive(st.pid, st.pid_start):
                raise RuntimeFailure(f"VM {st.hostname} exited while booting", evidence=self._evidence(st, argv))
            try:
                reader, writer = await self._connect(st, SSH_PORT, timeout=1.0)
            except OSError as exc:
                last_error = str(exc)
            else:
                try:
                    banner = await asyncio.wait_for(reader.read(4), timeout=2.0)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                if banner == b"SSH-":
                    if st.fresh_host_keys:  # init has made the copy's own keys before starting sshd
                        st.fresh_host_keys = False
                        self._save(st)
                    return
                last_error = f"unexpected banner {banner!r}"
            await asyncio.sleep(0.05)
        raise RuntimeFailure(
            f"VM {st.hostname} did not answer on port 22 within {self.boot_timeout:.0f}s ({last_error})",
            evidence=self._evidence(st, argv),
        )

    def _evidence(self, st: VmState, argv: list[str]) -> str:
        try:
            tail = self._console(st.vm_id).read_text(errors="replace").splitlines()[-30:]
        except OSError:
            tail = ["(no console log)"]
        return "$ " + shlex.join(argv) + "\n--- console tail ---\n" + "\n".join(tail)

    async def stop(self, vm_id: str, timeout: float = 10.0) -> None:
        """SIGTERM the guest's init, SIGKILL after ``timeout``, then release mounts, netns and cgroup."""
        async with self._lock(vm_id):
            st = self._state(vm_id)
            await self._kill_init(st, timeout)
            await self._teardown(st)

    async def _kill_init(self, st: VmState, timeout: float) -> None:
        if not alive(st.pid, st.pid_start):
            return
        kill(st.pid, st.pid_start, signal.SIGTERM)
        if not await host.wait_dead(st.pid, st.pid_start, timeout):
            kill(st.pid, st.pid_start, signal.SIGKILL)
            if not await host.wait_dead(st.pid, st.pid_start, 10.0):
                raise RuntimeFailure(f"VM {st.hostname} (pid {st.pid}) does not die")

    async def _teardown(self, st: VmState) -> None:
        """Release everything a (dead) VM holds on the host except its disk. Idempotent."""
        kill(st.egress_pid, st.egress_start, signal.SIGTERM)
        if st.egress_pid:
            await asyncio.to_thread(host.reap, st.egress_pid)
        await asyncio.to_thread(self._teardown_sync, st)
        st.pid = st.pid_start = st.egress_pid = st.egress_start = None
        if self._sidecar(st.vm_id).exists():
            self._save(st)

    def _teardown_sync(self, st: VmState) -> None:
        # Every process of the VM (guest and exec helpers) is in its cgroup: empty it before unmounting, so the
        # filesystem is really released before the disk can be mounted again.
        self.cgroups.remove(st.vm_id)
        vm_dir = self._vm_dir(st.vm_id)
        for name in ("root", "lower-map", "disk-map", "disk"):
            disks.unmount(vm_dir / name)
        if netns.exists(st.netns):
            failed = host.run_sync(["ip", "netns", "delete", st.netns])
            if failed and netns.exists(st.netns):
                raise RuntimeFailure(f"cannot delete network namespace {st.netns}: {failed}")

    async def destroy(self, vm_id: str) -> None:
        """Stop the VM and remove its disk, sidecar, mounts, namespace, cgroup and run directory."""
        try:
            st = self._state(vm_id)
        except NotFound:
            st = VmState(vm_id=vm_id, image="", digest="", disk=str(self._disk(vm_id)),
                         netns=netns.netns_name(vm_id))
        async with self._lock(vm_id):
            await self._kill_init(st, 10.0)
            await self._teardown(st)
            await asyncio.to_thread(self._disk(vm_id).unlink, missing_ok=True)  # a big sparse file: ~100 ms
            self._sidecar(vm_id).unlink(missing_ok=True)
            await asyncio.to_thread(disks.remove_tree, self._vm_dir(vm_id))
            self._states.pop(vm_id, None)
            self._env.pop(vm_id, None)
        self._locks.pop(vm_id, None)

    async def status(self, vm_id: str) -> VmStatus:
        try:
            st = self._state(vm_id)
        except NotFound:
            return VmStatus.ERROR
        if alive(st.pid, st.pid_start):
            return VmStatus.RUNNING
        return VmStatus.STOPPED if os.path.exists(st.disk) else VmStatus.ERROR  # noqa: ASYNC240

    # --- connections and processes -----------------------------------------------------------------------

    def _running(self, vm_id: str) -> VmState:
        st = self._state(vm_id)
        if not alive(st.pid, st.pid_start):
            raise StateError(f"VM {st.hostname or vm_id} is not running")
        return st

    async def exec(
        self, vm_id: str, argv: list[str], *, stdin: bytes = b"", user: str = "ussycode", timeout: float = 60.0
    ) -> ExecResult:
        """Run ``argv`` in the VM as ``user`` (login-like environment, no shell), with pipes."""
        st = self._running(vm_id)
        try:
            with guestfs.root_fd(f"/proc/{st.pid}/root") as root:
                passwd = guestfs.read_text(root, "/etc/passwd")
                group = guestfs.read_text(root, "/etc/group")
        except OSError as exc:
            raise RuntimeFailure(f"cannot read the VM's user database: {exc}") from exc
        uid, gid, groups, home = parse_passwd(passwd, group, user)
        env = {
            "HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/bin/bash", "LANG": "C.UTF-8",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            **self._env.get(vm_id, {}),
        }
        full = nsinit.exec_argv(
            self.python, pid=st.pid or 0, uid=uid, gid=gid, groups=groups, cwd=home, env=env,
            cgroup_procs=self.cgroups.procs_files(vm_id), argv=argv,
        )
        child = await proc.spawn(proc.as_guest_priority(full), stdin=proc.PIPE, stdout=proc.PIPE, stderr=proc.PIPE,
                                 start_new_session=True, cwd="/")
        try:
            out, err = await proc.communicate(child, stdin, timeout)
        except TimeoutError:
            raise RuntimeFailure(f"command timed out after {timeout:.0f}s in VM {st.hostname}",
                                 evidence=shlex.join(argv)) from None
        return ExecResult(exit_status=child.returncode, stdout=out, stderr=err)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None



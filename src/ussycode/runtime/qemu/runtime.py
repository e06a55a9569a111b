"""QemuRuntime: each VM is a daemonized QEMU in its own network namespace, controlled over QMP.

Files per VM: ``<data_dir>/qemu/vms/<id>/`` holds what must survive (``disk.qcow2`` over the image's shared ext4
base, ``vm.json``, ``console.log``); ``<run_dir>/<hash>/`` holds what dies with the host (QMP socket, pidfile,
config drive). QEMU is started with ``-daemonize``, so it outlives the server; :meth:`get_state` /
:meth:`load_state` carry the pid and QMP socket to a restarted server. Status is the truth of ``/proc``: a QEMU
killed from outside reads as STOPPED on the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import socket
import tarfile
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import QMPClient, QMPError

from ussycode.errors import ImageError, NotFound, RuntimeFailure, StateError, UsageError
from ussycode.runtime import kernel, kvm, netns, rootfs
from ussycode.runtime.base import ExecResult, HostCheck, Runtime
from ussycode.runtime.proc import as_guest_priority
from ussycode.runtime.qemu import network
from ussycode.runtime.qemu.argv import Accel, Machine, QemuConfig, build_argv, validate
from ussycode.runtime.vmm import VmmHost, VmPaths, console_tail, evidence, exit_code, read_pid
from ussycode.types import VmSpec, VmStatus

log = logging.getLogger(__name__)
__all__ = ["QemuRuntime", "VmPaths", "config_drive", "console_tail", "exit_code", "qemu_alive", "read_pid"]


class ImageLike(Protocol):
    name: str
    digest: str

    @property
    def rootfs(self) -> Path: ...


class ImageSource(Protocol):
    """What the VM runtimes need from :class:`~ussycode.runtime.images.ImageStore`."""

    async def ensure_built(self, name: str) -> Any: ...


def config_drive(spec: VmSpec, extra_keys: tuple[str, ...] = (), resolv: str = "") -> bytes:
    """The config drive the guest's init reads: a tar of hostname, authorized_keys, env.sh, vm-id (pure).

    ``vm-id`` lets the guest tell a copied disk from its own: the init makes new SSH host keys when the disk's
    keys were made by another VM (:meth:`QemuRuntime.copy_disk` copies them along with everything else).
    """
    keys = "".join(k.strip() + "\n" for k in (*spec.authorized_keys, *extra_keys) if k.strip())
    env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(spec.env.items()) if k.isidentifier())
    files = {
        "hostname": (spec.hostname or spec.name) + "\n",
        "authorized_keys": keys,
        "env.sh": "# written by ussycode from the VM's metadata\n" + env,
        "vm-id": spec.id + "\n",
    }
    if resolv:
        files["resolv.conf"] = resolv
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def qemu_alive(pid: int | None, vm_id: str, marker: bytes | None = None) -> bool:
    """The process ``pid`` is running (not a zombie) and is this VM's QEMU (pids get reused)."""
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and (marker or f"ussy-{vm_id},".encode()) in cmdline


class QemuRuntime(Runtime):
    """VMs as QEMU processes (KVM when it really works here, else TCG). See the module docstring."""

    name = "qemu"

    def __init__(
        self,
        data_dir: Path,
        images: ImageSource,
        *,
        run_dir: Path,
        machine: Machine = Machine.Q35,
        accel: Accel | None = None,
        egress: bool = True,
        boot_timeout: float = 180.0,
    ) -> None:
        # Files, pids, namespaces, sshd waits and exec over SSH are the VmmHost's (shared with Firecracker by
        # composition); QEMU's own parts (argv, QMP, slirp forwards) are here.
        self.vmm = VmmHost(data_dir / "qemu", run_dir, is_ours=qemu_alive, guest_ip="127.0.0.1",
                           boot_timeout=boot_timeout, pool_name="qemu-netns")
        self.images = images
        self.machine = machine
        self._accel = accel
        self.egress = egress

    @property
    def data_dir(self) -> Path:
        return self.vmm.data_dir

    @property
    def run_root(self) -> Path:
        return self.vmm.run_root

    @property
    def boot_timeout(self) -> float:
        return self.vmm.boot_timeout

    @boot_timeout.setter
    def boot_timeout(self, value: float) -> None:
        self.vmm.boot_timeout = value

    # --- host checks ------------------------------------------------------------------------------------

    @classmethod
    def check(cls) -> HostCheck:
        if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
            return HostCheck(False, "QEMU is not installed (apt-get install qemu-system-x86 qemu-utils)")
        if shutil.which("nsenter") is None or shutil.which("nft") is None:
            return HostCheck(False, "nsenter and nft are needed for VM network isolation (util-linux, nftables)")
        try:
            guest = kernel.find_kernel()
            kernel._find_busybox()
        except ImageError as exc:
            return HostCheck(False, f"{exc.user_message} ({exc.log_message})")
        verdict = kvm.kvm_verdict(Path("/var/cache/ussycode"), timeout=20.0)
        mode = "KVM" if verdict.usable else f"TCG (slow: {verdict.reason})"
        return HostCheck(True, f"QEMU with kernel {guest.release}, {mode}")

    def accel(self) -> Accel:
        if self._accel is None:
            verdict = kvm.kvm_verdict(self.data_dir / "cache")
            self._accel = Accel.KVM if verdict.usable else Accel.TCG
            log.info("qemu runtime: %s (%s)", self._accel, verdict.reason)
        return self._accel

    # --- paths and state --------------------------------------------------------------------------------

    def console_log(self, vm_id: str) -> Path | None:
        return self.paths(vm_id).console

    def paths(self, vm_id: str) -> VmPaths:
        return self.vmm.paths(vm_id)

    def netns_name(self, vm_id: str) -> str:
        return self.vmm.netns_name(vm_id)

    def _pid(self, vm_id: str) -> int | None:
        return self.vmm.pid(vm_id)

    def _running(self, vm_id: str) -> bool:
        return self.vmm.running(vm_id)

    async def status(self, vm_id: str) -> VmStatus:
        return await self.vmm.status(vm_id)

    def get_state(self, vm_id: str) -> dict[str, Any]:
        return self.vmm.state(vm_id)

    async def list_vms(self) -> list[str]:
        return await self.vmm.list_vms()

    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None:
        if await self.vmm.adopt(vm_id, state):
            # Prove the control channel is still there (the socket lives in the run dir, the pid may be stale).
            await self._qmp(vm_id, "query-status")

    # --- lifecycle --------------------------------------------------------------------------------------

    async def create(self, spec: VmSpec) -> None:
        problem = validate(spec.cpu, spec.memory_mb)
        if problem:
            raise UsageError(f"VM {spec.name}: {problem}")
        p = self.paths(spec.id)
        if p.disk.exists():
            return
        try:
            image = await self.images.ensure_built(spec.image)
            ref = rootfs.ImageRef(image.name, image.digest, image.rootfs)
            base = await rootfs.ensure_base_ext4(ref, self.data_dir / "bases")
            await rootfs.create_disk(base, p.disk, spec.disk_gb)
            _write_json(p.meta, {"image": image.name, "digest": image.digest, "base": str(base)})
        except BaseException:
            shutil.rmtree(p.vm_dir, ignore_errors=True)
            raise

    async def start(self, spec: VmSpec) -> None:
        if self._running(spec.id):
            return
        problem = validate(spec.cpu, spec.memory_mb)
        if problem:
            raise UsageError(f"VM {spec.name}: {problem}")
        p = self.paths(spec.id)
        if not p.disk.exists():
            raise NotFound(f"VM {spec.name} has no disk; create it first")
        await rootfs.check_disk(p.disk)
        guest = kernel.find_kernel()
        initrd = await asyncio.to_thread(kernel.build_initramfs, self.data_dir / "cache", guest)
        accel = await asyncio.to_thread(self.accel)
        key = await self.vmm.runtime_key()
        p.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (p.qmp, p.pidfile):
            stale.unlink(missing_ok=True)
        p.config_drive.write_bytes(config_drive(spec, (key.export_public_key().decode().strip(),)))
        p.console.write_bytes(b"")
        ns = self.netns_name(spec.id)
        await network.ensure_netns(ns, egress=self.egress, pasta_pidfile=p.pasta_pidfile)
        cfg = QemuConfig(
            vm_id=spec.id, cpu=spec.cpu, memory_mb=spec.memory_mb, kernel=guest.vmlinuz, initrd=initrd,
            disk=p.disk, config_drive=p.config_drive, console_log=p.console, qmp_socket=p.qmp,
            pidfile=p.pidfile, machine=self.machine, accel=accel,
        )
        argv = build_argv(cfg)
        full = network.exec_prefix(ns) + as_guest_priority(argv)
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:  # QEMU daemonizes once its devices are set up: the parent exits within seconds
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            out = (await proc.communicate())[0] + b"\n(QEMU did not daemonize within 60 s)"
            await self.vmm.kill(spec.id)
        if proc.returncode != 0:
            await self.vmm.cleanup_run(spec.id)
            raise RuntimeFailure(
                f"QEMU could not start VM {spec.name}",
                evidence=evidence(full, out.decode(errors="replace") + console_tail(p.console)),
                reason="boot_failed",
            )
        self.vmm.forwards[spec.id] = {22}
        try:
            await self.vmm.wait_ssh(spec, full)
        except BaseException:
            await self.vmm.kill(spec.id)
            await self.vmm.cleanup_run(spec.id)
            raise

    async def stop(self, vm_id: str, timeout: float = 10.0) -> None:
        """ACPI power button over QMP, QEMU killed after ``timeout``, then the run files cleaned up."""
        async def power_button() -> None:
            with contextlib.suppress(QMPError, OSError, RuntimeFailure):
                await self._qmp(vm_id, "system_powerdown")

        await self.vmm.stop(vm_id, timeout, power_button)

    async def destroy(self, vm_id: str) -> None:
        await self.vmm.destroy(vm_id, lambda: self.stop(vm_id, timeout=5.0))

    async def copy_disk(self, src_id: str, dst: VmSpec) -> None:
        src = self.paths(src_id)
        if not src.disk.exists():
            raise NotFound(f"VM {src_id} has no disk to copy")
        if self._running(src_id):
            raise StateError(f"VM {src_id} is running; stop it before copying its disk")
        d = self.paths(dst.id)
        if d.disk.exists():
            raise StateError(f"VM {dst.name} already has a disk")
        try:
            await rootfs.copy_disk(src.disk, d.disk)
            shutil.copy(src.meta, d.meta)
            info = await rootfs.disk_info(d.disk)
            size = info.get("virtual-size")
            if isinstance(size, int) and dst.disk_gb * 2**30 > size:
                await rootfs.resize_disk(d.disk, dst.disk_gb)
        except BaseException:
            shutil.rmtree(d.vm_dir, ignore_errors=True)
            raise

    async def disk_usage(self, vm_id: str) -> int:
        return rootfs.allocated_bytes(self.paths(vm_id).disk)

    # --- connections --------------------------------------------------------------------------------

    async def _connect(self, vm_id: str, port: int, timeout: float = 5.0) -> socket.socket:
        return await self.vmm.connect(vm_id, port, timeout)

    async def port_netns(self, vm_id: str, port: int) -> Path | None:
        """The VM's namespace: QEMU's user-mode network forwards the port on that namespace's loopback."""
        await self._ensure_forward(vm_id, port)
        return netns.NETNS_DIR / self.netns_name(vm_id)

    async def open_listener(self, vm_id: str, host: str, port: int) -> socket.socket:
        """``host:port`` as the guest sees it: QEMU's user-mode network opens the guest's connections from inside
        the VM's namespace, where this listens (the metadata service: same identity rule as containers)."""
        if await self.status(vm_id) is not VmStatus.RUNNING:
            raise NotFound(f"VM {vm_id} is not running")
        return await self.vmm.listen(vm_id, host, port)

    async def open_socket(self, vm_id: str, port: int) -> socket.socket:
        await self._ensure_forward(vm_id, port)
        try:
            return await self._connect(vm_id, port)
        except OSError as exc:
            raise ConnectionRefusedError(f"nothing accepts connections on port {port} in VM {vm_id}: {exc}") from exc

    async def _ensure_forward(self, vm_id: str, port: int) -> None:
        if not 1 <= port <= 65535:
            raise UsageError(f"port {port} is not a TCP port")
        if not self._running(vm_id):
            raise StateError(f"VM {vm_id} is not running")
        forwards = self.vmm.forwards.setdefault(vm_id, {22})
        if port not in forwards:
            # A new slirp forward on the namespace's loopback (QMP → HMP: QEMU has no QMP command for it).
            reply = await self._qmp(
                vm_id, "human-monitor-command", {"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-:{port}"}
            )
            if isinstance(reply, str) and reply.strip() and "could not" in reply.lower():
                raise RuntimeFailure(f"could not forward port {port} of VM {vm_id}", evidence=reply)
            forwards.add(port)

    async def exec(
        self, vm_id: str, argv: list[str], *, stdin: bytes = b"", user: str = "ussycode", timeout: float = 60.0
    ) -> ExecResult:
        """Run ``argv`` in the guest over SSH (as ``ussycode``; other users through ``sudo -n -u``)."""
        sock = await self.open_socket(vm_id, 22)
        return await self.vmm.exec(vm_id, sock, argv, stdin=stdin, user=user, timeout=timeout)

    async def _qmp(self, vm_id: str, cmd: str, args: dict[str, object] | None = None) -> object:
        qmp = QMPClient(f"ussy-{vm_id}")
        try:
            async with asyncio.timeout(10.0):
                await qmp.connect(str(self.paths(vm_id).qmp))
                return await qmp.execute(cmd, args)
        except (QMPError, OSError, TimeoutError) as exc:
            raise RuntimeFailure(f"QMP {cmd} failed for VM {vm_id}: {exc}", reason="qmp") from exc
        finally:
            with contextlib.suppress(QMPError, OSError):
                await qmp.disconnect()

    async def close(self) -> None:
        self.vmm.close()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)

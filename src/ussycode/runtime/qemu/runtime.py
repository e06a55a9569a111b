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
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncssh
from qemu.qmp import QMPClient, QMPError

from ussycode.errors import ImageError, NotFound, RuntimeFailure, StateError, UsageError
from ussycode.runtime import kernel, kvm, netns, rootfs
from ussycode.runtime.base import ExecResult, HostCheck, Runtime
from ussycode.runtime.qemu import network
from ussycode.runtime.qemu.argv import Accel, Machine, QemuConfig, build_argv, format_argv, validate
from ussycode.types import VmSpec, VmStatus

log = logging.getLogger(__name__)

CONSOLE_TAIL = 3000
SSH_BANNER = b"SSH-2.0-"


class ImageLike(Protocol):
    name: str
    digest: str

    @property
    def rootfs(self) -> Path: ...


class ImageSource(Protocol):
    """What the VM runtimes need from :class:`~ussycode.runtime.images.ImageStore`."""

    async def ensure_built(self, name: str) -> Any: ...


@dataclass(frozen=True)
class VmPaths:
    vm_dir: Path
    run_dir: Path

    @property
    def disk(self) -> Path:
        return self.vm_dir / "disk.qcow2"

    @property
    def meta(self) -> Path:
        return self.vm_dir / "vm.json"

    @property
    def console(self) -> Path:
        return self.vm_dir / "console.log"

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def pasta_pidfile(self) -> Path:
        return self.run_dir / "pasta.pid"

    @property
    def config_drive(self) -> Path:
        return self.run_dir / "config.tar"


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


def exit_code(status: int | None, exit_signal: tuple[str, bool, str, str] | None) -> int:
    """A shell-style exit code from what sshd reported: the status, or 128 + n for a process killed by signal n.

    sshd reports a killed process as a signal name with no status (asyncssh: ``exit_status`` -1), where the
    container runtime, like a shell, says ``128 + n`` (137 for the OOM killer's SIGKILL).
    """
    if exit_signal is not None:
        try:
            return 128 + int(signal.Signals["SIG" + exit_signal[0].removeprefix("SIG")])
        except KeyError:
            return 255
    return status if status is not None and status >= 0 else 255


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


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


def console_tail(path: Path, limit: int = CONSOLE_TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no console log)"


class QemuRuntime(Runtime):
    """VMs as QEMU processes (KVM when it really works here, else TCG). See the module docstring."""

    name = "qemu"

    def __init__(
        self,
        data_dir: Path,
        images: ImageSource,
        *,
        run_dir: Path = Path("/run/ussycode/qemu"),
        machine: Machine = Machine.Q35,
        accel: Accel | None = None,
        egress: bool = True,
        boot_timeout: float = 180.0,
    ) -> None:
        self.data_dir = data_dir / "qemu"
        self.images = images
        self.run_root = run_dir
        self.machine = machine
        self._accel = accel
        self.egress = egress
        self.boot_timeout = boot_timeout
        self._forwards: dict[str, set[int]] = {}
        self._ns_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qemu-netns")
        self._key: asyncssh.SSHKey | None = None

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

    def paths(self, vm_id: str) -> VmPaths:
        short = hashlib.sha256(vm_id.encode()).hexdigest()[:12]
        return VmPaths(self.data_dir / "vms" / vm_id, self.run_root / short)

    def netns_name(self, vm_id: str) -> str:
        return netns.netns_name(vm_id)

    def _pid(self, vm_id: str) -> int | None:
        return read_pid(self.paths(vm_id).pidfile)

    def _is_ours(self, pid: int | None, vm_id: str) -> bool:
        return qemu_alive(pid, vm_id)

    def _running(self, vm_id: str) -> bool:
        return self._is_ours(self._pid(vm_id), vm_id)

    async def status(self, vm_id: str) -> VmStatus:
        if not self.paths(vm_id).vm_dir.exists():
            return VmStatus.STOPPED
        return VmStatus.RUNNING if self._running(vm_id) else VmStatus.STOPPED

    def get_state(self, vm_id: str) -> dict[str, Any]:
        p = self.paths(vm_id)
        return {
            "pid": self._pid(vm_id),
            "qmp_socket": str(p.qmp),
            "netns": self.netns_name(vm_id),
            "forwards": sorted(self._forwards.get(vm_id, {22})),
        }

    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None:
        pid = state.get("pid")
        p = self.paths(vm_id)
        if isinstance(pid, int) and self._is_ours(pid, vm_id):
            p.run_dir.mkdir(parents=True, exist_ok=True)
            if read_pid(p.pidfile) != pid:
                p.pidfile.write_text(f"{pid}\n")
            self._forwards[vm_id] = {int(x) for x in state.get("forwards", [22])}
            # Prove the control channel is still there (the socket lives in /run, the pid may be stale).
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
        key = await self._runtime_key()
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
        full = network.exec_prefix(ns) + argv
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            await self._cleanup_run(spec.id)
            raise RuntimeFailure(
                f"QEMU could not start VM {spec.name}",
                evidence=self._evidence(full, out.decode(errors="replace") + console_tail(p.console)),
                reason="boot_failed",
            )
        self._forwards[spec.id] = {22}
        try:
            await self._wait_ssh(spec, full)
        except BaseException:
            await self._kill(spec.id)
            await self._cleanup_run(spec.id)
            raise

    async def _wait_ssh(self, spec: VmSpec, argv: list[str]) -> None:
        p = self.paths(spec.id)
        deadline = time.monotonic() + self.boot_timeout
        why = "timed out"
        while time.monotonic() < deadline:
            if not self._running(spec.id):
                why = "QEMU exited"
                break
            if b"ussycode-init: FAILED" in console_tail(p.console).encode():
                await asyncio.sleep(0.5)
                why = "the guest init failed"
                break
            try:
                sock = await self._connect(spec.id, 22, timeout=2.0)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            try:
                reader, writer = await asyncio.open_connection(sock=sock)
                try:
                    banner = await asyncio.wait_for(reader.readline(), 5.0)
                finally:
                    writer.close()
                if banner.startswith(SSH_BANNER):
                    return
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
        waited = self.boot_timeout - (deadline - time.monotonic())
        raise RuntimeFailure(
            f"VM {spec.name} did not boot to sshd ({why} after {waited:.0f} s)",
            evidence=self._evidence(argv, console_tail(p.console)),
            reason="boot_failed",
        )

    @staticmethod
    def _evidence(argv: list[str], tail: str) -> str:
        return f"$ {format_argv(argv)}\n--- console tail ---\n{tail.rstrip()}"

    async def stop(self, vm_id: str, timeout: float = 10.0) -> None:
        if self._running(vm_id):
            with contextlib.suppress(QMPError, OSError, RuntimeFailure):
                await self._qmp(vm_id, "system_powerdown")
            if not await self._wait_exit(vm_id, timeout):
                log.warning("VM %s ignored the ACPI power button for %.0f s; killing QEMU", vm_id, timeout)
                await self._kill(vm_id)
        await self._cleanup_run(vm_id)

    async def _wait_exit(self, vm_id: str, timeout: float) -> bool:
        """Poll /proc until QEMU is gone (it is not our child after -daemonize, so there is nothing to wait on)."""
        deadline = time.monotonic() + timeout
        while self._running(vm_id):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _kill(self, vm_id: str) -> None:
        pid = self._pid(vm_id)
        if pid is None or not self._is_ours(pid, vm_id):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await self._wait_exit(vm_id, 5.0)

    async def _cleanup_run(self, vm_id: str) -> None:
        p = self.paths(vm_id)
        await network.remove_netns(self.netns_name(vm_id), p.pasta_pidfile)
        shutil.rmtree(p.run_dir, ignore_errors=True)
        self._forwards.pop(vm_id, None)

    async def destroy(self, vm_id: str) -> None:
        await self.stop(vm_id, timeout=5.0)
        shutil.rmtree(self.paths(vm_id).vm_dir, ignore_errors=True)

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
        loop = asyncio.get_running_loop()
        ns = self.netns_name(vm_id)
        try:
            return await loop.run_in_executor(self._ns_pool, netns.connect_in_netns, ns, "127.0.0.1", port, timeout)
        except netns.NetnsBroken:
            # That worker thread is stuck in the VM's namespace: retire the whole pool.
            self._ns_pool.shutdown(wait=False)
            self._ns_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qemu-netns")
            raise

    async def port_netns(self, vm_id: str, port: int) -> Path | None:
        """The VM's namespace: QEMU's user-mode network forwards the port on that namespace's loopback."""
        await self._ensure_forward(vm_id, port)
        return netns.NETNS_DIR / self.netns_name(vm_id)

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
        forwards = self._forwards.setdefault(vm_id, {22})
        if port not in forwards:
            # A new slirp forward on the namespace's loopback (QMP → HMP: QEMU has no QMP command for it).
            reply = await self._qmp(
                vm_id, "human-monitor-command", {"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-:{port}"}
            )
            if isinstance(reply, str) and reply.strip() and "could not" in reply.lower():
                raise RuntimeFailure(f"could not forward port {port} of VM {vm_id}", evidence=reply)
            forwards.add(port)

    async def _runtime_key(self) -> asyncssh.SSHKey:
        """The runtime's own SSH key (for :meth:`exec`), installed in every guest next to the user's keys."""
        if self._key is None:
            path = self.data_dir / "runtime_ed25519"
            if path.exists():
                self._key = asyncssh.read_private_key(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                key = asyncssh.generate_private_key("ssh-ed25519", comment="ussycode-runtime")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key.export_private_key())
                self._key = key
        return self._key

    async def exec(
        self, vm_id: str, argv: list[str], *, stdin: bytes = b"", user: str = "ussycode", timeout: float = 60.0
    ) -> ExecResult:
        """Run ``argv`` in the guest over SSH (as ``ussycode``; other users through ``sudo -n -u``)."""
        key = await self._runtime_key()
        sock = await self.open_socket(vm_id, 22)
        command = shlex.join(argv)
        if user != "ussycode":
            command = shlex.join(["sudo", "-n", "-u", user, "--", *argv])
        try:
            async with asyncio.timeout(timeout):
                async with asyncssh.connect(
                    sock=sock, username="ussycode", client_keys=[key], known_hosts=None, config=()
                ) as conn:
                    result = await conn.run(command, input=stdin, encoding=None, check=False)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise RuntimeFailure(f"could not run a command in VM {vm_id}: {exc}", reason="exec_failed") from exc
        out = result.stdout if isinstance(result.stdout, bytes) else b""
        err = result.stderr if isinstance(result.stderr, bytes) else b""
        return ExecResult(exit_code(result.exit_status, result.exit_signal), out, err)

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
        self._ns_pool.shutdown(wait=False)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)

"""FirecrackerRuntime: one Firecracker process per VM, configured over its HTTP API on a unix socket.

Same guest as the qemu runtime (kernel, initramfs, config drive, ext4 from the same image), but Firecracker
boots the uncompressed ``vmlinux`` and reads only raw disks: a VM disk is a sparse (reflinked where the file
system can) copy of the image's ext4 base, grown to the VM's size. The VM's network is a tap device inside the
VM's own network namespace (Firecracker runs there too), so the host never routes to the guest; host → guest
sockets are made inside that namespace. Stop is ``SendCtrlAltDel`` (the guest init powers off), then kill.

Lifecycle bookkeeping (paths, status from ``/proc``, exec over SSH, re-attach) is shared with
:class:`~ussycode.runtime.qemu.runtime.QemuRuntime`; only the VMM-specific parts are overridden here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from ussycode.errors import NotFound, RuntimeFailure, StateError, UsageError
from ussycode.runtime import kernel, kvm, netns, rootfs
from ussycode.runtime.base import HostCheck
from ussycode.runtime.firecracker import payloads
from ussycode.runtime.qemu import network
from ussycode.runtime.qemu.argv import GUEST_ADDR, GUEST_GW
from ussycode.runtime.qemu.runtime import QemuRuntime, config_drive, console_tail, qemu_alive
from ussycode.types import VmSpec

TAP = "tap0"
GUEST_IP = GUEST_ADDR.split("/", 1)[0]


def firecracker_reason(binary: str = "firecracker", cache_dir: Path = Path("/var/cache/ussycode")) -> str | None:
    """Why Firecracker cannot run here, or ``None``."""
    if shutil.which(binary) is None:
        return f"the {binary} binary is not installed (get a release from github.com/firecracker-microvm/firecracker)"
    verdict = kvm.kvm_verdict(cache_dir)
    if not verdict.usable:
        return f"KVM is not usable: {verdict.reason}"
    return None


class FirecrackerApi:
    """A thin client for Firecracker's API socket (one request at a time; errors carry ``fault_message``)."""

    def __init__(self, socket_path: Path, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.socket_path = socket_path
        self._transport = transport or httpx.AsyncHTTPTransport(uds=str(socket_path))

    async def call(self, call: payloads.ApiCall, timeout: float = 10.0) -> httpx.Response:
        async with httpx.AsyncClient(transport=self._transport, base_url="http://localhost", timeout=timeout) as c:
            resp = await c.request(call.method, call.path, json=call.body)
        if resp.status_code >= 300:
            try:
                fault = resp.json().get("fault_message", resp.text)
            except ValueError:
                fault = resp.text
            raise RuntimeFailure(
                f"Firecracker refused {call.method} {call.path}: {fault}",
                evidence=f"{call.method} {call.path} {call.body}\n-> {resp.status_code} {resp.text}",
                reason="firecracker_api",
            )
        return resp

    async def describe(self) -> dict[str, Any]:
        async with httpx.AsyncClient(transport=self._transport, base_url="http://localhost", timeout=5.0) as c:
            resp = await c.get("/")
        data: dict[str, Any] = resp.json()
        return data


class FirecrackerRuntime(QemuRuntime):
    name = "firecracker"

    def __init__(self, data_dir: Path, images: Any, *, binary: str = "firecracker", **kw: Any) -> None:
        super().__init__(data_dir, images, **kw)
        self.data_dir = data_dir / "firecracker"
        self.binary = binary
        self.jailer = shutil.which("jailer")

    @classmethod
    def check(cls) -> HostCheck:
        reason = firecracker_reason()
        return HostCheck(reason is None, reason or "firecracker with working KVM")

    def _is_ours(self, pid: int | None, vm_id: str) -> bool:
        return qemu_alive(pid, vm_id, marker=payloads.jail_id(vm_id).encode() + b"\0")

    def _api(self, vm_id: str) -> FirecrackerApi:
        return FirecrackerApi(self.paths(vm_id).run_dir / "api.sock")

    async def create(self, spec: VmSpec) -> None:
        try:
            payloads.machine_config(spec.cpu, spec.memory_mb)
        except ValueError as exc:
            raise UsageError(f"VM {spec.name}: {exc}") from exc
        p = self.paths(spec.id)
        disk = p.vm_dir / "disk.raw"
        if disk.exists():
            return
        try:
            image = await self.images.ensure_built(spec.image)
            ref = rootfs.ImageRef(image.name, image.digest, image.rootfs)
            base = await rootfs.ensure_base_ext4(ref, self.data_dir / "bases")
            p.vm_dir.mkdir(parents=True, exist_ok=True)
            await rootfs._run(["cp", "--sparse=always", "--reflink=auto", str(base), str(disk)], "copying the image")
            disk.chmod(0o600)
            os.truncate(disk, spec.disk_gb * 2**30)
        except BaseException:
            shutil.rmtree(p.vm_dir, ignore_errors=True)
            raise

    async def start(self, spec: VmSpec) -> None:
        if self._running(spec.id):
            return
        reason = await asyncio.to_thread(firecracker_reason, self.binary, self.data_dir / "cache")
        if reason:
            raise RuntimeFailure(f"cannot start VM {spec.name} with Firecracker: {reason}", reason="unavailable")
        try:
            payloads.machine_config(spec.cpu, spec.memory_mb)
        except ValueError as exc:
            raise UsageError(f"VM {spec.name}: {exc}") from exc
        p = self.paths(spec.id)
        disk = p.vm_dir / "disk.raw"
        if not disk.exists():
            raise NotFound(f"VM {spec.name} has no disk; create it first")
        guest = kernel.find_kernel()
        vmlinux = await asyncio.to_thread(kernel.build_vmlinux, self.data_dir / "cache", guest)
        initrd = await asyncio.to_thread(kernel.build_initramfs, self.data_dir / "cache", guest)
        key = await self._runtime_key()
        p.run_dir.mkdir(parents=True, exist_ok=True)
        api_sock = p.run_dir / "api.sock"
        api_sock.unlink(missing_ok=True)
        p.config_drive.write_bytes(config_drive(spec, (key.export_public_key().decode().strip(),)))
        ns = self.netns_name(spec.id)
        await network.ensure_netns(ns, egress=self.egress, pasta_pidfile=p.pasta_pidfile)
        for argv in tap_argvs(ns):
            code, out = await network._run(argv)
            if code != 0 and "File exists" not in out:
                await self._cleanup_run(spec.id)
                raise RuntimeFailure("could not create the VM's tap device", evidence=f"$ {argv}\n{out}")
        argv = network.exec_prefix(ns) + payloads.firecracker_argv(self.binary, api_sock, spec.id)
        with p.console.open("wb") as console:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=console, stderr=console, start_new_session=True
            )
        p.pidfile.write_text(f"{proc.pid}\n")
        try:
            await self._wait_socket(api_sock, argv, spec)
            api = self._api(spec.id)
            calls = payloads.boot_sequence(
                vm_id=spec.id, cpu=spec.cpu, memory_mb=spec.memory_mb, vmlinux=vmlinux, initrd=initrd,
                disk=disk, config_drive=p.config_drive, tap=TAP,
            )
            for call in calls:
                await api.call(call)
            self._forwards[spec.id] = {22}
            await self._wait_ssh(spec, argv)
        except BaseException:
            await self._kill(spec.id)
            await self._cleanup_run(spec.id)
            raise

    async def _wait_socket(self, sock: Path, argv: list[str], spec: VmSpec) -> None:
        deadline = time.monotonic() + 10.0
        while not _exists(sock):
            if time.monotonic() > deadline or not self._running(spec.id):
                raise RuntimeFailure(
                    f"Firecracker did not open its API socket for VM {spec.name}",
                    evidence=self._evidence(argv, console_tail(self.paths(spec.id).console)),
                    reason="boot_failed",
                )
            await asyncio.sleep(0.05)

    async def stop(self, vm_id: str, timeout: float = 10.0) -> None:
        if self._running(vm_id):
            with contextlib.suppress(RuntimeFailure, httpx.HTTPError, OSError):
                await self._api(vm_id).call(payloads.ApiCall("PUT", "/actions", payloads.action("SendCtrlAltDel")))
            if not await self._wait_exit(vm_id, timeout):
                await self._kill(vm_id)
        await self._cleanup_run(vm_id)

    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None:
        pid = state.get("pid")
        p = self.paths(vm_id)
        if isinstance(pid, int) and self._is_ours(pid, vm_id):
            p.run_dir.mkdir(parents=True, exist_ok=True)
            p.pidfile.write_text(f"{pid}\n")
            await self._api(vm_id).describe()

    async def _connect(self, vm_id: str, port: int, timeout: float = 5.0) -> socket.socket:
        loop = asyncio.get_running_loop()
        ns = self.netns_name(vm_id)
        # The guest's address exists only inside the VM's own namespace (on its tap link).
        sock = await loop.run_in_executor(self._ns_pool, netns.socket_in_netns, ns)
        return await netns.connect_socket(sock, GUEST_IP, port, timeout)

    async def open_socket(self, vm_id: str, port: int) -> socket.socket:
        if not 1 <= port <= 65535:
            raise UsageError(f"port {port} is not a TCP port")
        if not self._running(vm_id):
            raise StateError(f"VM {vm_id} is not running")
        return await self._connect(vm_id, port)

    async def copy_disk(self, src_id: str, dst: VmSpec) -> None:
        src = self.paths(src_id).vm_dir / "disk.raw"
        if not src.exists():
            raise NotFound(f"VM {src_id} has no disk to copy")
        if self._running(src_id):
            raise StateError(f"VM {src_id} is running; stop it before copying its disk")
        d = self.paths(dst.id)
        d.vm_dir.mkdir(parents=True, exist_ok=True)
        out = d.vm_dir / "disk.raw"
        try:
            await rootfs._run(["cp", "--sparse=always", "--reflink=auto", str(src), str(out)], "copying the disk")
            if dst.disk_gb * 2**30 > out.stat().st_size:
                os.truncate(out, dst.disk_gb * 2**30)
        except BaseException:
            shutil.rmtree(d.vm_dir, ignore_errors=True)
            raise

    async def disk_usage(self, vm_id: str) -> int:
        return rootfs.allocated_bytes(self.paths(vm_id).vm_dir / "disk.raw")


def _exists(path: Path) -> bool:
    return path.exists()


def tap_argvs(ns: str) -> list[list[str]]:
    """The tap device Firecracker attaches to, with the guest's gateway address, inside namespace ``ns`` (pure)."""
    prefix = GUEST_ADDR.split("/", 1)[1]
    return [
        ["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"],
        ["ip", "-n", ns, "addr", "add", f"{GUEST_GW}/{prefix}", "dev", TAP],
        ["ip", "-n", ns, "link", "set", TAP, "up"],
    ]


__all__ = ["FirecrackerApi", "FirecrackerRuntime", "firecracker_reason", "tap_argvs"]

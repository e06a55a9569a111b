"""FirecrackerRuntime: one Firecracker process per VM, configured over its HTTP API on a unix socket.

Same guest as the qemu runtime (kernel, initramfs, config drive, ext4 from the same image), but Firecracker
boots the uncompressed ``vmlinux`` and reads only raw disks: a VM disk is a sparse (reflinked where the file
system can) copy of the image's ext4 base, grown to the VM's size. The VM's network is a tap device inside the
VM's own network namespace (Firecracker runs there too), so the host never routes to the guest; host → guest
sockets are made inside that namespace. Stop is ``SendCtrlAltDel`` (the guest init powers off), then kill.

Lifecycle bookkeeping (paths, status from ``/proc``, exec over SSH, re-attach) is a
:class:`~ussycode.runtime.vmm.VmmHost` this runtime owns, as the QEMU runtime owns its own (composition).
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
from ussycode.runtime import kernel, kvm, rootfs
from ussycode.runtime.base import ExecResult, HostCheck, Runtime
from ussycode.runtime.firecracker import payloads
from ussycode.runtime.proc import as_guest_priority
from ussycode.runtime.qemu import network
from ussycode.runtime.qemu.argv import GUEST_ADDR, GUEST_GW
from ussycode.runtime.qemu.runtime import config_drive, qemu_alive
from ussycode.runtime.vmm import VmmHost, VmPaths, console_tail, evidence
from ussycode.types import VmSpec, VmStatus

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


class FirecrackerRuntime(Runtime):
    """VMs as Firecracker processes. Files, pids, namespaces, sshd waits and exec over SSH are a
    :class:`~ussycode.runtime.vmm.VmmHost` (the QEMU runtime owns one too); booting through the API is here."""

    name = "firecracker"

    def __init__(self, data_dir: Path, images: Any, *, run_dir: Path, binary: str = "firecracker",
                 egress: bool = True, boot_timeout: float = 180.0) -> None:
        self.vmm = VmmHost(data_dir / "firecracker", run_dir, is_ours=self._is_ours, guest_ip=GUEST_IP,
                           boot_timeout=boot_timeout, pool_name="fc-netns")
        self.images = images
        self.egress = egress
        self.binary = binary
        self.jailer = shutil.which("jailer")

    @property
    def data_dir(self) -> Path:
        return self.vmm.data_dir

    @property
    def run_root(self) -> Path:
        return self.vmm.run_root

    @property
    def boot_timeout(self) -> float:
        return self.vmm.boot_timeout

    @classmethod
    def check(cls) -> HostCheck:
        reason = firecracker_reason()
        return HostCheck(reason is None, reason or "firecracker with working KVM")

    @staticmethod
    def _is_ours(pid: int | None, vm_id: str) -> bool:
        return qemu_alive(pid, vm_id, marker=payloads.jail_id(vm_id).encode() + b"\0")

    def _api(self, vm_id: str) -> FirecrackerApi:
        return FirecrackerApi(self.paths(vm_id).run_dir / "api.sock")

    # --- what the VmmHost knows --------------------------------------------------------------------------
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

    async def destroy(self, vm_id: str) -> None:
        await self.vmm.destroy(vm_id, lambda: self.stop(vm_id, timeout=5.0))

    async def exec(
        self, vm_id: str, argv: list[str], *, stdin: bytes = b"", user: str = "ussycode", timeout: float = 60.0
    ) -> ExecResult:
        sock = await self.open_socket(vm_id, 22)
        return await self.vmm.exec(vm_id, sock, argv, stdin=stdin, user=user, timeout=timeout)

    async def close(self) -> None:
        self.vmm.close()

    # --- Firecracker's own ------------------------------------------------------------------------------
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
        key = await self.vmm.runtime_key()
        p.run_dir.mkdir(parents=True, exist_ok=True)
        api_sock = p.run_dir / "api.sock"
        api_sock.unlink(missing_ok=True)
        p.config_drive.write_bytes(config_drive(spec, (key.export_public_key().decode().strip(),)))
        ns = self.netns_name(spec.id)
        await network.ensure_netns(ns, egress=self.egress, pasta_pidfile=p.pasta_pidfile)
        for argv in tap_argvs(ns):
            code, out = await network._run(argv)
            if code != 0 and "File exists" not in out:
                await self.vmm.cleanup_run(spec.id)
                raise RuntimeFailure("could not create the VM's tap device", evidence=f"$ {argv}\n{out}")
        argv = network.exec_prefix(ns) + as_guest_priority(payloads.firecracker_argv(self.binary, api_sock, spec.id))
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
            self.vmm.forwards[spec.id] = {22}
            await self.vmm.wait_ssh(spec, argv)
        except BaseException:
            await self.vmm.kill(spec.id)
            await self.vmm.cleanup_run(spec.id)
            raise

    async def _wait_socket(self, sock: Path, argv: list[str], spec: VmSpec) -> None:
        deadline = time.monotonic() + 10.0
        while not _exists(sock):
            if time.monotonic() > deadline or not self._running(spec.id):
                raise RuntimeFailure(
                    f"Firecracker did not open its API socket for VM {spec.name}",
                    evidence=evidence(argv, console_tail(self.paths(spec.id).console)),
                    reason="boot_failed",
                )
            await asyncio.sleep(0.05)

    async def stop(self, vm_id: str, timeout: float = 10.0) -> None:
        """``SendCtrlAltDel`` (the guest init powers off), Firecracker killed after ``timeout``, then clean up."""

        async def ctrl_alt_del() -> None:
            with contextlib.suppress(RuntimeFailure, httpx.HTTPError, OSError):
                await self._api(vm_id).call(payloads.ApiCall("PUT", "/actions", payloads.action("SendCtrlAltDel")))

        await self.vmm.stop(vm_id, timeout, ctrl_alt_del)

    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None:
        if await self.vmm.adopt(vm_id, state):
            await self._api(vm_id).describe()

    async def _connect(self, vm_id: str, port: int, timeout: float = 5.0) -> socket.socket:
        # The guest's address exists only inside the VM's own namespace (on its tap link).
        return await self.vmm.connect(vm_id, port, timeout)

    async def open_listener(self, vm_id: str, host: str, port: int) -> socket.socket:
        """``host:port`` as the guest sees it: the VM's namespace owns the metadata address, so the guest's
        connections to it (routed out of its tap) are delivered to this listener."""
        if await self.status(vm_id) is not VmStatus.RUNNING:
            raise NotFound(f"VM {vm_id} is not running")
        return await self.vmm.listen(vm_id, host, port)

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

"""What the VMM-process runtimes (QEMU, Firecracker) share, as a part they each own (composition, not a base).

A :class:`VmmHost` keeps one runtime's files (``<data_dir>/vms/<id>/``: disk, metadata, console log) and per-boot
run files (``<run_dir>/<hash>/``: pidfile, control socket, config drive), tells whether a VM's VMM process runs
(``is_ours`` says what that runtime's process looks like: pids get reused), makes sockets into the VM's network
namespace, waits for the guest's sshd, runs commands in the guest over SSH with the runtime's own key, and stops,
kills and cleans up a VMM process. What differs between VMMs (how to boot, how to ask for a shutdown, where the
guest's address is) stays in each runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from ussycode.errors import RuntimeFailure
from ussycode.runtime import disks, netns
from ussycode.runtime.base import ExecResult
from ussycode.types import VmSpec, VmStatus

CONSOLE_TAIL = 3000
SSH_BANNER = b"SSH-2.0-"
IsOurs = Callable[[int | None, str], bool]


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


def console_tail(path: Path, limit: int = CONSOLE_TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return "(no console log)"


def evidence(argv: list[str], tail: str) -> str:
    return f"$ {shlex.join(argv)}\n--- console tail ---\n{tail.rstrip()}"


class VmmHost:
    """The host side of one VMM runtime's VMs (see the module docstring)."""

    def __init__(self, data_dir: Path, run_root: Path, *, is_ours: IsOurs, guest_ip: str, boot_timeout: float,
                 pool_name: str) -> None:
        self.data_dir = data_dir
        self.run_root = run_root
        self.is_ours = is_ours
        self.guest_ip = guest_ip
        self.boot_timeout = boot_timeout
        self.forwards: dict[str, set[int]] = {}
        self._pool_name = pool_name
        self._ns_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=pool_name)
        self._key: asyncssh.SSHKey | None = None

    # --- files and processes ------------------------------------------------------------------------
    def paths(self, vm_id: str) -> VmPaths:
        short = hashlib.sha256(vm_id.encode()).hexdigest()[:12]
        return VmPaths(self.data_dir / "vms" / vm_id, self.run_root / short)

    @staticmethod
    def netns_name(vm_id: str) -> str:
        return netns.netns_name(vm_id)

    def pid(self, vm_id: str) -> int | None:
        return read_pid(self.paths(vm_id).pidfile)

    def running(self, vm_id: str) -> bool:
        return self.is_ours(self.pid(vm_id), vm_id)

    async def status(self, vm_id: str) -> VmStatus:
        if not self.paths(vm_id).vm_dir.exists():
            return VmStatus.STOPPED
        return VmStatus.RUNNING if self.running(vm_id) else VmStatus.STOPPED

    def state(self, vm_id: str) -> dict[str, Any]:
        p = self.paths(vm_id)
        return {"pid": self.pid(vm_id), "qmp_socket": str(p.qmp), "netns": self.netns_name(vm_id),
                "forwards": sorted(self.forwards.get(vm_id, {22}))}

    async def adopt(self, vm_id: str, state: dict[str, Any]) -> bool:
        """Take over a VMM process a previous server started (its pid from ``state``); False if it is gone."""
        pid = state.get("pid")
        p = self.paths(vm_id)
        if not (isinstance(pid, int) and self.is_ours(pid, vm_id)):
            return False
        p.run_dir.mkdir(parents=True, exist_ok=True)
        if read_pid(p.pidfile) != pid:
            p.pidfile.write_text(f"{pid}\n")
        self.forwards[vm_id] = {int(x) for x in state.get("forwards", [22])}
        return True

    async def list_vms(self) -> list[str]:
        """Every VM with a directory under ``<data_dir>/vms``."""
        vms = self.data_dir / "vms"
        return sorted(p.name for p in await asyncio.to_thread(lambda: list(vms.iterdir()) if vms.is_dir() else []))

    async def wait_exit(self, vm_id: str, timeout: float) -> bool:
        """Poll /proc until the VMM is gone (it is not our child after it daemonized: nothing to wait on)."""
        deadline = time.monotonic() + timeout
        while self.running(vm_id):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def kill(self, vm_id: str) -> None:
        pid = self.pid(vm_id)
        if pid is None or not self.is_ours(pid, vm_id):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await self.wait_exit(vm_id, 5.0)

    async def stop(self, vm_id: str, timeout: float, ask: Callable[[], Awaitable[None]]) -> None:
        """``ask`` the guest to power off, kill the VMM after ``timeout``, then clean up the run files."""
        if self.running(vm_id):
            await ask()
            if not await self.wait_exit(vm_id, timeout):
                await self.kill(vm_id)
        await self.cleanup_run(vm_id)

    async def cleanup_run(self, vm_id: str) -> None:
        from ussycode.runtime.qemu import network  # the namespace helpers both VMMs use (import cycle otherwise)

        p = self.paths(vm_id)
        await network.remove_netns(self.netns_name(vm_id), p.pasta_pidfile)
        disks.remove_tree(p.run_dir)
        self.forwards.pop(vm_id, None)

    async def destroy(self, vm_id: str, stop: Callable[[], Awaitable[None]]) -> None:
        await stop()
        disks.remove_tree(self.paths(vm_id).vm_dir)

    # --- connections and the guest -------------------------------------------------------------------
    async def connect(self, vm_id: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A socket made in the VM's namespace (on a worker thread), connected on the loop to the guest."""
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(self._ns_pool, netns.socket_in_netns, self.netns_name(vm_id))
        except netns.NetnsBroken:
            # That worker thread is stuck in the VM's namespace: retire the whole pool.
            self._ns_pool.shutdown(wait=False)
            self._ns_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=self._pool_name)
            raise
        return await netns.connect_socket(sock, self.guest_ip, port, timeout)

    async def listen(self, vm_id: str, host: str, port: int) -> socket.socket:
        """A listening socket on ``host:port`` in the VM's namespace (the metadata address is on its loopback):
        the guest's user-mode network connects there for it, so whoever is accepted is that VM."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._ns_pool, netns.listen_in_netns, self.netns_name(vm_id), host,
                                              port)
        except netns.NetnsBroken:
            self._ns_pool.shutdown(wait=False)
            self._ns_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=self._pool_name)
            raise

    async def wait_ssh(self, spec: VmSpec, argv: list[str]) -> None:
        """Return once the guest's sshd sends its banner; RuntimeFailure (with evidence) otherwise."""
        p = self.paths(spec.id)
        deadline = time.monotonic() + self.boot_timeout
        why = "timed out"
        while time.monotonic() < deadline:
            if not self.running(spec.id):
                why = "the VMM exited"
                break
            if b"ussycode-init: FAILED" in console_tail(p.console).encode():
                await asyncio.sleep(0.5)
                why = "the guest init failed"
                break
            try:
                sock = await self.connect(spec.id, 22, timeout=2.0)
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
            evidence=evidence(argv, console_tail(p.console)),
            reason="boot_failed",
        )

    async def runtime_key(self) -> asyncssh.SSHKey:
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

    async def exec(self, vm_id: str, sock: socket.socket, argv: list[str], *, stdin: bytes, user: str,
                   timeout: float) -> ExecResult:
        """Run ``argv`` in the guest over SSH on ``sock`` (as ``ussycode``; others through ``sudo -n -u``)."""
        key = await self.runtime_key()
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

    def close(self) -> None:
        self._ns_pool.shutdown(wait=False)

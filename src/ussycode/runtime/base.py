"""The runtime interface every VM backend implements.

A runtime turns a :class:`~ussycode.types.VmSpec` into a running machine and back. The core owns all state: what
a runtime needs to find its VM again after the server restarts goes into the JSON blob returned by
:meth:`Runtime.get_state`, which the core stores in the DB and hands back to :meth:`Runtime.load_state`.

An implementation **must**:

- ``create(spec)``: make the VM's persistent disk from the image (the disk size is a hard limit). Not started.
- ``start(vm_id)``: boot it; return only when the guest's sshd accepts connections on port 22, or raise
  :class:`~ussycode.errors.RuntimeFailure` carrying the command line and console tail. Idempotent when running.
- ``stop(vm_id)``: shut it down in order (then kill after a timeout); the disk survives. Idempotent.
- ``destroy(vm_id)``: stop it and remove everything it owns on the host (disk, mounts, namespaces, sockets).
- ``status(vm_id)``: what is true now (``RUNNING`` or ``STOPPED``; ``ERROR`` if it cannot tell).
- ``open_socket(vm_id, port)`` (and so ``open_connection``): a TCP connection to ``port`` inside the VM, made
  from the host side without
  routing to a guest address (a socket made inside the VM's network namespace, a vsock, a unix forwarder).
- ``copy_disk(src_id, dst_spec)``: a new, independent VM disk with the source's contents (the source is stopped).
- ``exec(vm_id, argv, ...)``: run a process in the guest with pipes (used by tests, the doctor and init tasks).
- ``get_state(vm_id)`` / ``load_state(vm_id, state)``: re-attach to a running VM after a server restart.
- ``list_vms()``: the ids of every VM it holds on this host (running or not), found from the host itself (its
  disks and run files), not from memory: the core compares them with the DB to stop VMs that have no row.

An implementation **may** override ``check()`` to say whether it can run on this host (``doctor`` prints it).
Guest contract: user ``ussycode`` (uid 1000, passwordless sudo), sshd on port 22 accepting the gateway key, the
whole root filesystem persists across stop/start, environment from the spec in login shells.
"""

from __future__ import annotations

import abc
import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ussycode.types import VmSpec, VmStatus


@dataclass(frozen=True)
class HostCheck:
    ok: bool
    reason: str


@dataclass
class ExecResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


class Runtime(abc.ABC):
    name: str = "abstract"

    @classmethod
    def check(cls) -> HostCheck:
        """Whether this runtime can run on this host, with a reason a person can act on."""
        return HostCheck(True, "available")

    @abc.abstractmethod
    async def create(self, spec: VmSpec) -> None: ...

    @abc.abstractmethod
    async def start(self, spec: VmSpec) -> None: ...

    @abc.abstractmethod
    async def stop(self, vm_id: str, timeout: float = 10.0) -> None: ...

    @abc.abstractmethod
    async def destroy(self, vm_id: str) -> None: ...

    @abc.abstractmethod
    async def status(self, vm_id: str) -> VmStatus: ...

    async def open_socket(self, vm_id: str, port: int) -> socket.socket:
        """A connected, non-blocking socket to ``port`` inside the VM (the gateway hands it to asyncssh)."""
        raise NotImplementedError(f"{self.name} runtime cannot open sockets into VMs")

    async def open_listener(self, vm_id: str, host: str, port: int) -> socket.socket:
        """A listening socket on ``host:port`` as the VM sees it, accepted by the server (the metadata service).

        Optional: a runtime that cannot offer it raises NotImplementedError and its VMs have no metadata service.
        """
        raise NotImplementedError(f"{self.name} runtime cannot listen inside VMs")

    async def port_netns(self, vm_id: str, port: int) -> Path | None:
        """A network namespace (its ``/run/netns`` path) in which ``127.0.0.1:port`` reaches the VM's ``port``,
        after making that so; the HTTPS entry then runs a C forwarder there instead of piping bytes through
        Python. Optional: None (the default) means "use :meth:`open_connection`"."""
        return None

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams to ``port`` inside the VM; by default over :meth:`open_socket`."""
        sock = await self.open_socket(vm_id, port)
        return await asyncio.open_connection(sock=sock)

    @abc.abstractmethod
    async def copy_disk(self, src_id: str, dst: VmSpec) -> None: ...

    @abc.abstractmethod
    async def exec(
        self, vm_id: str, argv: list[str], *, stdin: bytes = b"", user: str = "ussycode", timeout: float = 60.0
    ) -> ExecResult: ...

    @abc.abstractmethod
    def get_state(self, vm_id: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def list_vms(self) -> list[str]:
        """Ids of the VMs this runtime holds on this host (running or stopped), read from the host."""

    @abc.abstractmethod
    async def load_state(self, vm_id: str, state: dict[str, Any]) -> None: ...

    async def disk_usage(self, vm_id: str) -> int:
        """Bytes the VM's disk really occupies on the host (sparse-aware). Optional."""
        return 0

    def console_log(self, vm_id: str) -> Path | None:
        """The file the guest's console (boot and init output) goes to, if this runtime keeps one."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless a runtime holds host resources
        """Release host resources held by the server process (not the VMs: they keep running)."""

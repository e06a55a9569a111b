"""Direct VM access: the client's session is carried to the guest's sshd, through the runtime's socket.

The gateway never routes to a guest address: it asks the runtime for a socket into the VM (port 22) and runs an
SSH client over it, logging in as ``ussycode`` with the gateway's own client key (which the runtime installs in
the guest). PTY requests and resizes, exec commands, subsystems (sftp), stdin/stdout/stderr (binary-safe), EOF,
signals and the exit status all pass through.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.process import SSHServerProcess

from ussycode import telemetry
from ussycode.errors import RuntimeFailure, StateError
from ussycode.types import VmStatus

if TYPE_CHECKING:
    from ussycode.ssh.server import ConnState, Gateway

log = logging.getLogger(__name__)
GUEST_USER = "ussycode"


async def connect_to_vm(gateway: Gateway, vm_id: str, vm_name: str) -> asyncssh.SSHClientConnection:
    vm = await gateway.services.vms.by_name(vm_name)
    if vm is None or vm.id != vm_id:
        raise StateError(f"{vm_name} no longer exists")
    pending = gateway.services.vms.pending(vm.id)
    if pending is not None:  # e.g. still re-attaching after a server restart
        raise StateError(f"{vm_name} is {pending}; try again in a moment", reason="pending")
    if vm.status is not VmStatus.RUNNING:
        raise StateError(f"{vm_name} is {vm.status}; start it with 'start {vm_name}'")
    runtime = gateway.services.vms.runtime
    try:
        sock = await runtime.open_socket(vm_id, 22)
        # The socket leads into this VM's own namespace, so nobody can sit in the middle: the guest's host key
        # need not be checked here.
        return await asyncssh.connect(
            sock=sock, username=GUEST_USER, client_keys=[gateway.client_key], known_hosts=None,
            agent_path=None, config=[], preferred_auth="publickey", connect_timeout=15,
            keepalive_interval=30,
        )
    except (OSError, asyncssh.Error) as exc:
        raise RuntimeFailure(f"cannot reach {vm_name}'s SSH server: {exc}", log_message=repr(exc)) from exc


class PassthroughProcess(SSHServerProcess[Any]):
    """A server process that accepts every subsystem and leaves it to the guest's sshd.

    asyncssh would otherwise refuse ``sftp`` (no local SFTP factory) or serve it itself; here the request must
    reach the guest untouched, so the subsystem is hidden from asyncssh's start-up dispatch and restored at once
    for :func:`forward` to pass on.
    """

    def subsystem_requested(self, subsystem: str) -> bool:
        return True

    def session_started(self) -> None:
        chan: Any = self._chan
        subsystem = chan._subsystem
        chan._subsystem = None
        try:
            super().session_started()
        finally:
            chan._subsystem = subsystem


class VmPassthrough:
    def __init__(self, gateway: Gateway, state: ConnState) -> None:
        self.gateway = gateway
        self.state = state

    async def upstream(self) -> asyncssh.SSHClientConnection:
        if self.state.upstream is None:
            vm = self.state.vm
            assert vm is not None
            self.state.upstream = await connect_to_vm(self.gateway, vm.id, vm.name)
        conn: asyncssh.SSHClientConnection = self.state.upstream
        return conn

    async def run(self, process: SSHServerProcess[Any]) -> None:
        key = self.state.key
        assert key is not None
        if not self.gateway.sessions.acquire(key.fingerprint):
            process.stderr.write(b"error: too many concurrent sessions for this key\r\n")
            process.exit(1)
            return
        self.gateway.live.add(process)
        telemetry.SSH_SESSIONS.labels("vm").inc()
        try:
            try:
                conn = await self.upstream()
            except (StateError, RuntimeFailure) as exc:
                process.stderr.write(f"error: {exc.user_message}\r\n".encode())
                process.exit(1)
                return
            status = await forward(conn, process, process.command, process.subsystem)
            process.exit(status)
        finally:
            self.gateway.live.discard(process)
            telemetry.SSH_SESSIONS.labels("vm").dec()
            self.gateway.sessions.release(key.fingerprint)


async def forward(conn: asyncssh.SSHClientConnection, process: SSHServerProcess[Any], command: str | None,
                  subsystem: str | None = None, *, keep_open: bool = False) -> int:
    """Run ``command`` (a login shell when None) or ``subsystem`` in the VM with the client's terminal and
    streams; returns the exit status to report.

    ``keep_open``: the client's session outlives the VM's (``ssh <vm>`` from the lobby), so EOF does not pass
    between them.
    """
    encoding, errors = process.channel.get_encoding()
    upstream = await conn.create_process(
        command=command, subsystem=subsystem,
        env=process.env, term_type=process.term_type, term_size=process.term_size,
        term_modes=process.term_modes, encoding=encoding, errors=errors,
        stdin=process.stdin, stdout=process.stdout, stderr=process.stderr,
        send_eof=not keep_open, recv_eof=not keep_open,
    )
    await upstream.wait_closed()
    if upstream.exit_signal is not None:
        return 128 + 15
    return upstream.exit_status if upstream.exit_status is not None else 255


class VmTcpSession(asyncssh.SSHTCPSession[bytes]):
    """An ``ssh -L`` channel joined to a TCP stream into the VM (from the runtime, never a guest address)."""

    HIGH_WATER = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._pump: asyncio.Task[None] | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan

    def session_started(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._vm_to_client(), name="ssh-L-pump")  # noqa: TID251

    async def _vm_to_client(self) -> None:
        assert self.chan is not None
        try:
            while data := await self.reader.read(65536):
                await self._can_write.wait()
                self.chan.write(data)
            self.chan.write_eof()
        except (OSError, asyncssh.Error):
            self.chan.close()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.writer.write(data)
        transport = self.writer.transport
        if self.chan is not None and transport.get_write_buffer_size() > self.HIGH_WATER:
            self.chan.pause_reading()
            asyncio.get_running_loop().create_task(self._drain(), name="ssh-L-drain")  # noqa: TID251

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        finally:
            if self.chan is not None:
                self.chan.resume_reading()

    def eof_received(self) -> bool:
        if self.writer.can_write_eof():
            self.writer.write_eof()
        return True

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self.writer.close()

"""The SSH gateway's connection handling: public-key auth only, then either the lobby or a VM.

Authentication accepts any well-formed key of a supported type (an unknown key may register); the session
decides what the key may do. ``ssh vm@host`` reaches the VM when the key's user may use that VM; any other user
name gets the lobby.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.process import SSHServerProcess
from asyncssh.sftp import MIN_SFTP_VERSION

from ussycode.auth.keys import PublicKey, describe
from ussycode.config import parse_addr
from ussycode.errors import UsageError, UssyError
from ussycode.services.container import Services
from ussycode.ssh.lobby import Lobby
from ussycode.ssh.passthrough import PassthroughProcess, VmPassthrough, VmTcpSession
from ussycode.store.users import User
from ussycode.store.vms import Vm

log = logging.getLogger(__name__)


@dataclass
class ConnState:
    """What one client connection has established."""

    username: str
    peer: str  # "host:port", for logs
    address: str = ""  # the client's IP address alone (registration limits count per address)
    key: PublicKey | None = None
    user: User | None = None
    vm: Vm | None = None
    upstream: Any = None  # the SSHClientConnection to the VM, opened on first use


class SessionCounter:
    """Concurrent sessions per key: a burst from one key cannot take the gateway down."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def acquire(self, fingerprint: str) -> bool:
        n = self.counts.get(fingerprint, 0)
        if n >= self.limit:
            return False
        self.counts[fingerprint] = n + 1
        return True

    def release(self, fingerprint: str) -> None:
        n = self.counts.get(fingerprint, 1) - 1
        if n <= 0:
            self.counts.pop(fingerprint, None)
        else:
            self.counts[fingerprint] = n


class GatewayConnection(asyncssh.SSHServer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.state = ConnState(username="", peer="")

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.state.peer = f"{peer[0]}:{peer[1]}"
        self.state.address = str(peer[0])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state.upstream is not None:
            self.state.upstream.close()

    def begin_auth(self, username: str) -> bool:
        self.state.username = username[:64]
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        try:
            described = describe(key)
        except UsageError as exc:
            log.info("refused key from %s: %s", self.state.peer, exc.user_message)
            return False
        # asyncssh verifies the client's signature after this returns True, so the key is proven.
        self.state.key = described
        self.state.user = await self.gateway.services.users.by_fingerprint(described.fingerprint)
        self.state.vm = None
        if self.state.user is not None and username and not self.state.user.suspended:
            vm = await self.gateway.services.vms.by_name(username)
            if vm is not None and vm.owner_id == self.state.user.id:
                self.state.vm = vm
        return True

    def session_requested(self) -> Any:
        assert self.conn is not None
        if self.state.vm is not None:
            chan = self.conn.create_server_channel(encoding=None)
            # The guest's own terminal does line editing; asyncssh's editor must stay out of a passthrough.
            chan._line_editor = False  # noqa: SLF001
            return chan, PassthroughProcess(VmPassthrough(self.gateway, self.state).run, None, MIN_SFTP_VERSION,
                                            False)
        chan = self.conn.create_server_channel(encoding="utf-8", errors="replace")
        return chan, SSHServerProcess(Lobby(self.gateway, self.state).run, None, MIN_SFTP_VERSION, False)

    async def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                                   orig_port: int) -> Any:
        """``ssh -L``: only into the VM this connection logged in to, through its guest sshd."""
        if self.state.vm is None or not 1 <= dest_port <= 65535:
            return False
        if dest_host not in ("localhost", "127.0.0.1", "::1"):
            return False  # only the VM's own loopback: the gateway is no jump host to other machines
        vm = self.state.vm
        try:
            reader, writer = await self.gateway.services.vms.runtime.open_connection(vm.id, dest_port)
        except (OSError, UssyError) as exc:
            log.info("ssh -L into %s:%d refused: %s", vm.name, dest_port, exc)
            return False
        return VmTcpSession(reader, writer)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no -R: the gateway never opens listeners for clients

    def unix_connection_requested(self, dest_path: str) -> bool:
        return False


class Gateway:
    """Owns the listener and what sessions share (services, keys, counters)."""

    def __init__(self, services: Services, host_key: asyncssh.SSHKey, client_key: asyncssh.SSHKey) -> None:
        self.services = services
        self.host_key = host_key
        self.client_key = client_key
        self.sessions = SessionCounter(services.settings.max_sessions_per_key)
        self.server: asyncssh.SSHAcceptor | None = None
        self.live: set[SSHServerProcess[Any]] = set()

    async def start(self, addr: str | None = None) -> int:
        host, port = parse_addr(addr or self.services.settings.ssh_addr)
        self.server = await asyncssh.listen(
            host or None, port, server_factory=lambda: GatewayConnection(self), server_host_keys=[self.host_key],
            encoding=None, line_editor=True, line_history=200, max_line_length=64 * 1024,
            login_timeout=30, keepalive_interval=30, keepalive_count_max=4,
            server_version="ussycode", allow_scp=False, agent_forwarding=False, x11_forwarding=False,
        )
        sock = self.server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, tell sessions we are going away, wait a little, then close."""
        if self.server is None:
            return
        self.server.close()
        for proc in list(self.live):
            try:
                proc.stderr.write(b"\r\nthe server is restarting; reconnect in a moment.\r\n"
                                  if proc.channel.get_encoding()[0] is None
                                  else "\r\nthe server is restarting; reconnect in a moment.\r\n")
                proc.exit(255)
            except Exception:  # noqa: S110 - best effort while shutting down
                pass
        await asyncio.wait_for(self.server.wait_closed(), timeout)

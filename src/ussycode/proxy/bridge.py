"""Port bridges: a unix socket per (VM, port) whose every connection is piped into the VM.

The host never routes to guest addresses (DESIGN §4). Caddy dials
``unix//<run-dir>/bridges/<vm>-<port>.sock``; the bridge accepts, asks the runtime for a stream into the VM
(:meth:`Runtime.open_connection`) and copies bytes both ways, passing half-closes through (EOF one way, the
other stays open). When the VM is not running or nothing listens on the port, the runtime's connect fails and
the bridge closes the client connection at once, so Caddy answers 502 (turned into a "VM not answering" page
by the server's error routes) instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Protocol

from ussycode.errors import RuntimeFailure, UssyError

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_UNIX_PATH = 107
_VM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConnectionOpener(Protocol):
    """What a bridge needs from a runtime (``Runtime`` satisfies it)."""

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


async def _close(writer: asyncio.StreamWriter, abort: bool = False) -> None:
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy until EOF, then half-close the other side. False if the copy broke (reset, write error)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return True
    except (ConnectionError, OSError):
        return False


async def pipe(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Copy a<->b until both directions end; a broken direction aborts both. Closes both writers."""
    (a_reader, a_writer), (b_reader, b_writer) = a, b

    async def one_way(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        if not await _pump(src, dst):
            # A reset on one side: tear down both, which ends the other direction's read too.
            a_writer.transport.abort()
            b_writer.transport.abort()

    try:
        await asyncio.gather(one_way(a_reader, b_writer), one_way(b_reader, a_writer))
    finally:
        await _close(a_writer)
        await _close(b_writer)


class PortBridge:
    """One unix-socket listener for (vm_id, port)."""

    def __init__(
        self,
        opener: ConnectionOpener,
        vm_id: str,
        port: int,
        path: Path,
        *,
        mode: int = 0o660,
        connect_timeout: float = 5.0,
    ) -> None:
        self.opener = opener
        self.vm_id = vm_id
        self.port = port
        self.path = path
        self.mode = mode
        self.connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[Any], list[asyncio.StreamWriter]] = {}
        self._closing = False

    @property
    def dial(self) -> str:
        """The Caddy upstream dial address for this bridge."""
        return f"unix/{self.path}"

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run; the directory is ours
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, self.mode)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        writers = [client_writer]
        if task is not None:
            self._conns[task] = writers
        try:
            try:
                upstream = await asyncio.wait_for(
                    self.opener.open_connection(self.vm_id, self.port), self.connect_timeout
                )
            except Exception as exc:  # fail closed: whatever the runtime raised, Caddy gets a fast 502
                expected = isinstance(exc, OSError | TimeoutError | UssyError)
                level = logging.DEBUG if expected else logging.WARNING
                log.log(level, "bridge %s:%d: connect failed: %r", self.vm_id, self.port, exc)
                await _close(client_writer, abort=True)
                return
            writers.append(upstream[1])
            if self._closing:
                upstream[1].transport.abort()
                client_writer.transport.abort()
            await pipe((client_reader, client_writer), upstream)
        finally:
            if task is not None:
                self._conns.pop(task, None)

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def close(self) -> None:
        """Stop listening, end open connections, remove the socket file."""
        server, self._server = self._server, None
        self._closing = True
        if server is not None:
            server.close()
        # End open connections by aborting their sockets (cancelling stream handler tasks makes asyncio log
        # errors on 3.11); the pumps then finish on their own.
        tasks = list(self._conns)
        for writers in list(self._conns.values()):
            for writer in writers:
                writer.transport.abort()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BridgeManager:
    """Owns every port bridge under ``<run_dir>/bridges``. ``dial_address`` is pure, so routes can be built
    before (or without) the bridge existing: a missing socket simply makes Caddy answer 502."""

    def __init__(
        self, opener: ConnectionOpener, run_dir: Path, *, mode: int = 0o660, connect_timeout: float = 5.0
    ) -> None:
        self.opener = opener
        self.dir = Path(run_dir) / "bridges"
        self.mode = mode
        self.connect_timeout = connect_timeout
        self._bridges: dict[tuple[str, int], PortBridge] = {}
        self._lock = asyncio.Lock()

    def socket_path(self, vm_id: str, port: int) -> Path:
        if not _VM_ID_RE.match(vm_id):
            raise ValueError(f"VM id not usable in a socket name: {vm_id!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"bad port: {port}")
        path = self.dir / f"{vm_id}-{port}.sock"
        if len(str(path)) > MAX_UNIX_PATH:
            raise RuntimeFailure(
                f"bridge socket path too long ({len(str(path))} > {MAX_UNIX_PATH} bytes): {path}; "
                "use a shorter --data-dir"
            )
        return path

    def dial_address(self, vm_id: str, port: int) -> str:
        return f"unix/{self.socket_path(vm_id, port)}"

    async def ensure(self, vm_id: str, port: int) -> PortBridge:
        """Start the bridge for (vm_id, port) if it is not running. Idempotent."""
        async with self._lock:
            bridge = self._bridges.get((vm_id, port))
            if bridge is not None:
                return bridge
            self.dir.mkdir(parents=True, exist_ok=True)
            # Group may enter (a Caddy in our group); others never reach a socket, even before its chmod.
            os.chmod(self.dir, 0o750)  # noqa: S103
            bridge = PortBridge(
                self.opener,
                vm_id,
                port,
                self.socket_path(vm_id, port),
                mode=self.mode,
                connect_timeout=self.connect_timeout,
            )
            await bridge.start()
            self._bridges[(vm_id, port)] = bridge
            return bridge

    async def remove(self, vm_id: str, port: int | None = None) -> None:
        """Close the VM's bridge for ``port``, or all of its bridges."""
        async with self._lock:
            keys = [k for k in self._bridges if k[0] == vm_id and (port is None or k[1] == port)]
            bridges = [self._bridges.pop(k) for k in keys]
        for bridge in bridges:
            await bridge.close()

    async def sync(self, wanted: set[tuple[str, int]]) -> None:
        """Make the running bridges exactly ``wanted`` (reconcile after a restart or a route change)."""
        for vm_id, port in sorted(set(self._bridges) - wanted):
            await self.remove(vm_id, port)
        for vm_id, port in sorted(wanted):
            await self.ensure(vm_id, port)

    def active(self) -> list[tuple[str, int]]:
        return sorted(self._bridges)

    async def close(self) -> None:
        async with self._lock:
            bridges = list(self._bridges.values())
            self._bridges.clear()
        for bridge in bridges:
            await bridge.close()

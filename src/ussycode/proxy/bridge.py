"""Port bridges: a unix socket per (VM, port) whose every connection reaches that port inside the VM.

No address of a guest is routed (DESIGN §4). Caddy dials ``unix//<run-dir>/bridges/<vm>-<port>.sock`` (except for
routed hosts, :mod:`ussycode.proxy.links`: addresses of the host's own, DNATed inside the VM's namespace).
Two implementations behind one socket path:

- :class:`Forwarder` (preferred): ``systemd-socket-proxyd`` (C, splice, one process per socket) started inside the
  VM's network namespace on a listening socket we bind and hand over, so no byte crosses Python. Used when the
  runtime names a namespace where ``127.0.0.1:<port>`` is the VM's port (:meth:`Runtime.port_netns`).
- :class:`PortBridge` (fallback): accepts, asks the runtime for a stream into the VM
  (:meth:`Runtime.open_connection`) and copies bytes both ways in Python, passing half-closes through.

Either way, when the VM is not running or nothing listens on the port, the connection is closed at once, so
Caddy answers 502 (turned into a "nothing answers on this port" page by the server's error routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Protocol

from ussycode.errors import RuntimeFailure, UssyError
from ussycode.spawn import DEVNULL, spawn, wait

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_UNIX_PATH = 107  # bytes in a unix socket address (sun_path) that a path may use
_VM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


PROXYD_PATHS = ("/lib/systemd/systemd-socket-proxyd", "/usr/lib/systemd/systemd-socket-proxyd")
FORWARDER_CONNECTIONS = 4096  # per (VM, port); each costs two sockets and two pipes in the forwarder
FORWARDER_NOFILE = 6 * FORWARDER_CONNECTIONS + 64

# fd 3 is the listening socket (socket activation; bash, as dash cannot dup fds above 9); the forwarder dies
# with us (pdeathsig) and enters the VM's network namespace only (nsenter execs without forking for --net, so
# LISTEN_PID=$$ stays right).
_FORWARDER_SCRIPT = (
    'ulimit -n "$4" 2>/dev/null; [ "$1" = 3 ] || { exec 3<&"$1" && eval "exec $1<&-"; }; '
    'LISTEN_FDS=1 LISTEN_PID=$$ exec setpriv --pdeathsig KILL -- nsenter --net="$2" -- "$5" '
    '--connections-max="$6" "127.0.0.1:$3"'
)


class ConnectionOpener(Protocol):
    """What a bridge needs from a runtime (``Runtime`` satisfies it)."""

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


def socket_name(vm_id: str, port: int | str) -> str:
    """A port bridge's socket file name in the bridges' directory (``port`` may be a Caddy placeholder)."""
    return f"{vm_id}-{port}.sock"


def proxyd_binary() -> str | None:
    """systemd-socket-proxyd (Debian's ``systemd`` package), or None."""
    return next((p for p in PROXYD_PATHS if os.access(p, os.X_OK)), None)


def forwarder_available() -> bool:
    return proxyd_binary() is not None and all(shutil.which(t) for t in ("bash", "setpriv", "nsenter"))


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
    def alive(self) -> bool:
        """Listening (it stops only when closed)."""
        return self._server is not None

    @property
    def connections(self) -> int:
        return len(self._conns)

    def exit_reason(self) -> str:
        return "closed"

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


class Forwarder:
    """``systemd-socket-proxyd`` in the VM's network namespace, listening on our unix socket at ``path``.

    We bind and chmod the socket, hand it over as fd 3 and close our copy: if the forwarder dies, connects are
    refused (a fast 502), never queued. :meth:`alive` lets the manager restart a dead one.
    """

    def __init__(self, netns_path: Path, vm_id: str, port: int, path: Path, *, mode: int = 0o660) -> None:
        self.netns_path = netns_path
        self.vm_id = vm_id
        self.port = port
        self.path = path
        self.mode = mode
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def dial(self) -> str:
        return f"unix/{self.path}"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.path.with_suffix(".log")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def exit_reason(self) -> str:
        """How a dead forwarder ended (its exit status or signal, the last line of its log), for the log."""
        code = None if self._proc is None else self._proc.poll()
        how = "never started" if self._proc is None else f"signal {-code}" if code is not None and code < 0 \
            else f"exit status {code}"
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 512))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            lines = []
        return f"{how}; {lines[-1][:200]!r}" if lines else how

    async def start(self) -> None:
        proxyd = proxyd_binary()
        if proxyd is None:
            raise RuntimeFailure("systemd-socket-proxyd is not installed (apt-get install systemd)")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, self.mode)
            sock.listen(1024)
            fd = sock.fileno()
            with self.log_path.open("ab") as log_file:
                self._proc = await spawn(
                    ["bash", "-c", _FORWARDER_SCRIPT, "ussycode-forwarder", str(fd), str(self.netns_path),
                     str(self.port), str(FORWARDER_NOFILE), proxyd, str(FORWARDER_CONNECTIONS)],
                    stdin=DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(fd,), start_new_session=True,
                )
        finally:
            sock.close()

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(wait(proc))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


Bridge = PortBridge | Forwarder


class BridgeManager:
    """Owns every port bridge under ``<run_dir>/bridges``. ``dial_address`` is pure, so routes can be built
    before (or without) the bridge existing: a missing socket simply makes Caddy answer 502. A C
    :class:`Forwarder` is used where the runtime offers ``port_netns`` and the host has systemd-socket-proxyd
    (``use_forwarders=False`` forces the Python bridge)."""

    def __init__(
        self, opener: ConnectionOpener, run_dir: Path, *, mode: int = 0o660, connect_timeout: float = 5.0,
        use_forwarders: bool = True,
    ) -> None:
        self.opener = opener
        self.dir = Path(run_dir) / "bridges"
        self.mode = mode
        self.connect_timeout = connect_timeout
        self._bridges: dict[tuple[str, int], PortBridge | Forwarder] = {}
        self._lock = asyncio.Lock()
        self.use_forwarders = use_forwarders and forwarder_available()

    def socket_path(self, vm_id: str, port: int) -> Path:
        if not _VM_ID_RE.match(vm_id):
            raise ValueError(f"VM id not usable in a socket name: {vm_id!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"bad port: {port}")
        path = self.dir / socket_name(vm_id, port)
        if len(str(path)) > MAX_UNIX_PATH:
            raise RuntimeFailure(
                f"bridge socket path too long ({len(str(path))} > {MAX_UNIX_PATH} bytes): {path}; "
                "use a shorter --data-dir"
            )
        return path

    def dial_address(self, vm_id: str, port: int) -> str:
        return f"unix/{self.socket_path(vm_id, port)}"

    async def ensure(self, vm_id: str, port: int) -> Bridge:
        """Start the bridge for (vm_id, port) if it is not running (or its forwarder died). Idempotent."""
        async with self._lock:
            bridge = self._bridges.get((vm_id, port))
            if bridge is not None:
                if bridge.alive:
                    return bridge
                log.warning("forwarder for %s:%d exited (%s); restarting it", vm_id, port, bridge.exit_reason())
                await bridge.close()
            self._prepare_dir()
            new = await self._start(vm_id, port, self.socket_path(vm_id, port))
            self._bridges[(vm_id, port)] = new
            return new

    def _prepare_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Group may enter (a Caddy in our group); others never reach a socket, even before its chmod.
        os.chmod(self.dir, 0o750)  # noqa: S103

    async def _start(self, vm_id: str, port: int, path: Path) -> Bridge:
        netns_path = await self.netns_for(vm_id, port)
        new: Bridge
        if netns_path is not None:
            new = Forwarder(netns_path, vm_id, port, path, mode=self.mode)
        else:
            new = PortBridge(self.opener, vm_id, port, path, mode=self.mode, connect_timeout=self.connect_timeout)
        await new.start()
        return new

    async def open_at(self, vm_id: str, port: int, path: Path) -> Bridge:
        """A bridge of its own for (vm_id, port), listening at ``path``; the caller owns it (``close()`` ends
        its connections and removes ``path``). Bound in our directory (a socket address has 107 bytes) and
        renamed into place."""
        self.socket_path(vm_id, port)  # the checks (and a shorter name than it fits)
        async with self._lock:  # one temporary name (forwarders started here log to .own.log)
            self._prepare_dir()
            tmp = self.dir / ".own.sock"
            new = await self._start(vm_id, port, tmp)
            try:
                os.replace(tmp, path)
            except OSError:
                await new.close()
                raise
        new.path = path
        return new

    async def netns_for(self, vm_id: str, port: int, *, forwarder: bool = True) -> Path | None:
        """Where ``127.0.0.1:port`` is the VM's port (a C forwarder or a routed host reaches it there), or None
        (the Python bridge). ``forwarder``: for a forwarder (None when forwarders are off)."""
        if forwarder and not self.use_forwarders:
            return None
        port_netns = getattr(self.opener, "port_netns", None)
        if port_netns is None:
            return None
        try:
            path: Path | None = await port_netns(vm_id, port)
        except (OSError, UssyError) as exc:
            log.debug("no namespace for %s:%d (%r): Python bridge", vm_id, port, exc)
            return None
        return path

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

    def get(self, vm_id: str, port: int) -> PortBridge | Forwarder | None:
        return self._bridges.get((vm_id, port))

    async def close(self) -> None:
        async with self._lock:
            bridges = list(self._bridges.values())
            self._bridges.clear()
        for bridge in bridges:
            await bridge.close()

"""A lean HTTP/1.1 listener for Caddy's forward-auth calls: the same endpoint, without the web stack around it.

Every request to a private VM URL (and every signed-in request to a public one) costs one forward-auth call, so
its fixed cost matters: here a request is parsed by ``httptools`` and handed, as a minimal ASGI scope, straight
to :func:`ussycode.api.auth_endpoint.forward_auth` — the one implementation of the endpoint, also mounted on the app
server — with no router, middleware or ASGI server in between. Only Caddy calls it (loopback, the forward-auth
key in the query); a bad request gets a 400 and the connection is closed. Keep-alive and pipelined requests
are answered in order on each connection.

Replays: when the endpoint marks an "allow" as depending only on the host and the credentials (``Replay``:
no share link in the URL, no cookie to set), the exact answer is kept and sent again for a request with the same
host, ``Cookie``, ``Authorization`` and key — until any DB write (the store's generation moves: a share removed,
a session revoked, a VM stopped or renamed, a token revoked), the session's expiry, or ``REPLAY_TTL``; never if
its forwarder is gone. Denials are never replayed. This caches decide()'s output; it makes no decision itself.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import httptools
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ussycode import telemetry
from ussycode.api.forward_auth import SHARE_PARAM
from ussycode.services.container import Services
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
MAX_HEAD = 64 * 1024
MAX_REPLAYS = 10_000  # Caddy forwards the client's headers; Caddy itself limits them to 1 MB, we to 64 KiB


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


class _Connection(asyncio.Protocol):
    def __init__(self, gate: ForwardAuthServer) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[tuple[bytes, list[tuple[bytes, bytes]], bool]] = collections.deque()
        self.busy = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.peer: tuple[str, int] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        self.gate.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        while data:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as upgrade:
                # An upgrade request (a WebSocket's handshake) is a whole request to us: on_message_complete
                # queued it; the parser stops there, so a new one reads what follows (a pipelined request).
                self.parser = httptools.HttpRequestParser(self)
                data = data[int(upgrade.args[0]):] if upgrade.args else b""
            except httptools.HttpParserError:
                self._fail()
                return

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            raise httptools.HttpParserError("headers too large")
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        self.pending.append((self.url, self.headers, self.parser.should_keep_alive()))
        if not self.busy:
            self.busy = True
            self.gate.tasks.spawn(self._serve(), "forward-auth-conn")

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()

    async def _serve(self) -> None:
        try:
            while self.pending and self.transport is not None:
                url, headers, keep_alive = self.pending.popleft()
                raw, key = self.gate.replayed(url, headers)
                if raw is None:
                    try:
                        response = await self.gate.answer(url, headers, self.peer)
                    except Exception:
                        log.exception("forward-auth failed")
                        response = Response("forward-auth failed\n", 500, media_type="text/plain")
                    head = [_status_line(response.status_code)]
                    head += [name + b": " + value + b"\r\n" for name, value in response.raw_headers]
                    raw = b"".join(head) + b"\r\n" + bytes(response.body)
                    self.gate.remember(key, response, raw)
                if self.transport is None:
                    return
                if keep_alive:
                    self.transport.write(raw)
                else:
                    head_end = raw.index(b"\r\n\r\n")
                    self.transport.write(raw[:head_end] + b"\r\nconnection: close" + raw[head_end:])
                    self.transport.close()
                    return
        finally:
            self.busy = False


class ForwardAuthServer:
    """Listens on ``host`` (a free port) and answers with ``handler`` (the forward-auth endpoint)."""

    def __init__(self, services: Services, handler: Handler) -> None:
        self.services = services
        self.app = Starlette()
        self.app.state.services = services
        self.replays: dict[tuple[bytes, ...], tuple[Any, bytes]] = {}
        self.handler = handler
        self.tasks = TaskGroup("forward-auth")
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, 0, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    def replayed(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, tuple[bytes, ...]]:
        """(the kept answer for this request, or None; the replay key)."""
        host = cookie = authorization = uri = b""
        for name, value in headers:
            if name == b"x-forwarded-host":
                host = value
            elif name == b"cookie":
                cookie += value + b"\x00"
            elif name == b"authorization":
                authorization += value + b"\x00"
            elif name == b"x-forwarded-uri":
                uri = value
        key = (url, host, cookie, authorization)
        _, _, query = uri.partition(b"?")
        if query and any(k == SHARE_PARAM for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)):
            return None, ()
        entry = self.replays.get(key)
        if entry is None:
            return None, key
        replay, raw = entry
        bridge = self.services.routes.bridges.get(replay.vm_id, replay.port) if self.services.routes else None
        alive = bridge is not None and getattr(bridge, "alive", True)
        if replay.generation != self.services.store.generation or replay.until <= time.monotonic() or not alive:
            del self.replays[key]
            return None, key
        telemetry.FORWARD_AUTH.labels("replayed").inc()
        return raw, key

    def remember(self, key: tuple[bytes, ...], response: Response, raw: bytes) -> None:
        replay = getattr(response, "replay", None)
        if replay is None or not key:
            return
        if len(self.replays) >= MAX_REPLAYS:
            self.replays.clear()
        self.replays[key] = (replay, raw)

    async def answer(self, url: bytes, headers: list[tuple[bytes, bytes]], peer: tuple[str, int] | None) -> Response:
        path, _, query = url.partition(b"?")
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path.decode("latin-1"), "raw_path": path, "query_string": query, "root_path": "",
            "headers": headers, "client": peer, "server": None, "app": self.app,
        }
        return await self.handler(Request(scope))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self.tasks.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

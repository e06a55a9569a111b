"""The lean forward-auth listener: real sockets, a stand-in endpoint; replays and what ends them."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ussycode.api.auth_endpoint import Replay
from ussycode.api.gate import ForwardAuthServer

AUTH = b"/__ussycode/forward-auth?k=key"


def services() -> Any:
    bridge = SimpleNamespace(alive=True)
    routes = SimpleNamespace(bridges=SimpleNamespace(get=lambda vm_id, port: bridge if vm_id == "vm1" else None))
    return SimpleNamespace(store=SimpleNamespace(generation=1), routes=routes, bridge=bridge)


async def request(port: int, headers: dict[str, str], path: bytes = AUTH, close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in headers.items()) + (b"Connection: close\r\n" if close else b"") + b"\r\n"
    count = 1 if close else 2
    writer.write(head * count)  # pipelined: both answered, in order
    data = b""
    while data.count(b"HTTP/1.1") < count or not data.endswith((b"ok", b"no")):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        data += chunk
    writer.close()
    return data


async def test_replays_only_allows_and_only_until_a_write() -> None:
    svc = services()
    calls: list[str] = []

    async def endpoint(req: Request) -> Response:
        calls.append(req.headers.get("x-forwarded-uri", ""))
        if req.headers.get("cookie") == "s=deny":
            return Response("no", 401)
        response = Response("ok", 200, headers={"X-Ussy-Handle": "alice"})
        response.replay = Replay(svc.store.generation, time.monotonic() + 5, "vm1", 8080)  # type: ignore[attr-defined]
        return response

    gate = ForwardAuthServer(svc, endpoint)
    port = await gate.start()
    try:
        allow = {"X-Forwarded-Host": "web.localhost", "Cookie": "s=1", "X-Forwarded-Uri": "/a"}
        data = await request(port, allow)
        assert data.count(b"HTTP/1.1 200 OK") == 2 and b"x-ussy-handle: alice" in data
        assert len(calls) == 1  # the second (pipelined) one was a replay
        await request(port, {**allow, "Cookie": "s=2"})
        assert len(calls) == 2  # other credentials: asked again
        svc.store.generation += 1  # any DB write
        await request(port, allow)
        assert len(calls) == 3
        await request(port, {**allow, "X-Forwarded-Uri": "/?ussy%5Fshare=x"})
        assert len(calls) == 5  # a share link in the URL is never replayed
        svc.bridge.alive = False  # the forwarder died: ask again (which restarts it)
        await request(port, allow)
        assert len(calls) == 7
        deny = {**allow, "Cookie": "s=deny"}
        data = await request(port, deny, close=True)
        assert b"401" in data and len(calls) >= 8  # denials are never replayed
        bad = await request(port, {"Transfer-Encoding": "chunked, x"}, path=b"/ bad")
        assert bad.startswith(b"HTTP/1.1 400")
    finally:
        await gate.close()


async def test_an_upgrade_request_is_answered_and_the_connection_reused() -> None:
    """A WebSocket handshake forwarded by Caddy carries ``Upgrade``: it is a whole request to forward-auth."""
    async def handler(request: Request) -> Response:
        return Response("ok", 200)

    gate = ForwardAuthServer(services(), handler)
    port = await gate.start()
    try:
        data = await request(port, {"Upgrade": "websocket", "Connection": "Upgrade", "X-Ussy-Proxy-Key": "k"})
        assert data.count(b"HTTP/1.1 200") == 2, data  # pipelined: the request after the upgrade one too
    finally:
        await gate.close()


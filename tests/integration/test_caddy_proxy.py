"""The real Caddy in front of real port bridges: forward-auth, header stripping, WebSockets, streaming,
stopped VMs, reconcile, internal TLS, start-up failures, attaching to an existing Caddy.

The "VM" is a local HTTP server reached through a fake runtime's open_connection (the real runtimes come with
their own conformance tests); everything else — Caddy 2.6, the bridges, the auth endpoint — is real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from ussycode.api.forward_auth import (
    AuthRequest,
    BearerView,
    Identity,
    ShareLink,
    ShareView,
    VmView,
    decide,
)
from ussycode.api.hostnames import parse_target
from ussycode.auth.links import link_token_hash
from ussycode.errors import RuntimeFailure
from ussycode.proxy.bridge import BridgeManager
from ussycode.proxy.caddy import CaddyAdmin, admin_transport
from ussycode.proxy.manager import (
    LOG_FIRST,
    PROXY_LOGGER,
    ExternalCaddy,
    ManagedCaddy,
    caddy_logging,
    go_runtime_env,
    machine_memory,
)
from ussycode.proxy.routes import (
    CATCHALL_ID,
    Route,
    RouteKind,
    ServerSettings,
    TlsMode,
    build_catchall,
    build_config,
    build_route,
    build_server,
)
from ussycode.tasks import TaskGroup

from .conftest import free_port

DOMAIN = "localhost"
ALICE = Identity("u1", "alice", "alice@example.com")
CAROL = Identity("u3", "carol", None)  # shared, no e-mail
BOB = Identity("u2", "bob", "bob@example.com")
SESSIONS = {"s-alice": ALICE, "s-bob": BOB, "s-carol": CAROL}
VMS = {
    "web": VmView("vm1", "web", ALICE.user_id, public_ports=frozenset({3000})),
    "pub": VmView("vm2", "pub", ALICE.user_id, public=True),
}
SHARES = ShareView(
    user_ids=frozenset({CAROL.user_id}),
    links=(ShareLink(link_token_hash("link-token-1234"), "vm1", 8080, datetime.now(UTC) + timedelta(hours=1)),),
)


# --- the "VM" apps ---------------------------------------------------------------------------------------------


async def vm_headers(request: Request) -> Response:
    body = (await request.body()).decode()
    return JSONResponse(
        {
            "headers": dict(request.headers),
            "raw_headers": [[k.decode(), v.decode()] for k, v in request.headers.raw],
            "method": request.method,
            "body": body,
            "path": request.url.path,
            "query": request.url.query,
        }
    )


async def vm_stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first\n"
        await asyncio.sleep(1.0)
        yield b"second\n"

    return StreamingResponse(chunks(), media_type="text/plain")


VM_APP = Starlette(
    routes=[StarletteRoute("/stream", vm_stream), StarletteRoute("/{p:path}", vm_headers, methods=["GET", "POST"])]
)


async def ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal RFC 6455 server: handshake, then echo each (masked, small) text frame back unmasked."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())  # noqa: S324
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    await writer.drain()
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            b0, b1 = await reader.readexactly(2)
            length = b1 & 0x7F
            mask = await reader.readexactly(4)
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(length)))
            if b0 & 0x0F == 0x8:
                break
            writer.write(bytes([0x81, len(payload)]) + payload)
            await writer.drain()
    writer.close()


# --- the forward-auth endpoint (what api/app.py will do with the store behind it) -------------------------------


async def forward_auth(request: Request) -> Response:
    areq = AuthRequest.from_headers(request.headers)
    try:
        target = parse_target(areq.host, DOMAIN)
        vm = VMS.get(target.vm_name or "")
    except ValueError:
        vm = None
    token = areq.bearer_token
    bearer = None if token is None else (BearerView(True, ALICE) if token == "usy1.good-token" else BearerView(False))
    d = decide(
        areq,
        domain=DOMAIN,
        vm=vm,
        shares=SHARES if vm and vm.id == "vm1" else ShareView(),
        session=SESSIONS.get(areq.cookies.get("sess", "")),
        bearer=bearer,
        now=datetime.now(UTC),
        login_url="http://localhost/__ussy/login",
    )
    return Response(d.body, status_code=d.status, headers=dict(d.headers), media_type=d.content_type)


AUTH_APP = Starlette(routes=[StarletteRoute("/__ussy/auth", forward_auth)])


class FakeRuntime:
    def __init__(self) -> None:
        self.ports: dict[tuple[str, int], int] = {}
        self.stopped: set[str] = set()

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if vm_id in self.stopped or (vm_id, port) not in self.ports:
            raise ConnectionRefusedError(111, "Connection refused")
        return await asyncio.open_connection("127.0.0.1", self.ports[(vm_id, port)])


async def serve_uvicorn(app: Any, tasks: TaskGroup) -> tuple[uvicorn.Server, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    tasks.spawn(server.serve(sockets=[sock]), f"uvicorn-{sock.getsockname()[1]}")
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.01)
    return server, int(sock.getsockname()[1])


@dataclass
class Stack:
    caddy: ManagedCaddy
    admin: CaddyAdmin
    runtime: FakeRuntime
    bridges: BridgeManager
    port: int
    auth_url: str
    base: Path

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def host(self, name: str) -> str:
        return f"{name}:{self.port}"

    @property
    def app(self) -> str:
        return self.auth_url.split("/")[2]

    def routes(self) -> list[Route]:
        return [
            Route(RouteKind.VM, "web.localhost", self.bridges.dial_address("vm1", 8080), auth_url=self.auth_url,
                  app=self.app),
            Route(RouteKind.PORT, "3000-web.localhost", self.bridges.dial_address("vm1", 3000), public=True,
                  app=self.app),
            Route(RouteKind.VM, "pub.localhost", self.bridges.dial_address("vm2", 8080), public=True, app=self.app),
        ]


@contextlib.asynccontextmanager
async def stack(tls: TlsMode) -> AsyncIterator[Stack]:
    tasks = TaskGroup("test-caddy")
    base = Path(tempfile.mkdtemp(prefix="uc", dir="/tmp"))
    vm_server, vm_port = await serve_uvicorn(VM_APP, tasks)
    auth_server, auth_port = await serve_uvicorn(AUTH_APP, tasks)
    ws = await asyncio.start_server(ws_echo, "127.0.0.1", 0)
    rt = FakeRuntime()
    rt.ports[("vm1", 8080)] = rt.ports[("vm2", 8080)] = vm_port
    rt.ports[("vm1", 3000)] = ws.sockets[0].getsockname()[1]
    bridges = BridgeManager(rt, base / "run", connect_timeout=2.0)
    for key in rt.ports:
        await bridges.ensure(*key)
    port = free_port()
    settings = ServerSettings(
        domain=DOMAIN, https_addr=f"127.0.0.1:{port}", http_addr=f"127.0.0.1:{auth_port}", tls=tls
    )
    st = Stack(None, None, rt, bridges, port, f"http://127.0.0.1:{auth_port}/__ussy/auth", base)  # type: ignore[arg-type]
    caddy = ManagedCaddy(base / "caddy", build_config(settings, st.routes()))
    st.caddy, st.admin = caddy, await caddy.start()
    try:
        yield st
    finally:
        await caddy.stop()
        await bridges.close()
        ws.close()
        vm_server.should_exit = auth_server.should_exit = True
        await asyncio.sleep(0.2)
        await tasks.close()
        shutil.rmtree(base, ignore_errors=True)


# --- tests -----------------------------------------------------------------------------------------------------

HTML = {"Accept": "text/html"}


async def test_forward_auth_allow_deny_and_header_stripping() -> None:
    async with stack(TlsMode.OFF) as st, httpx.AsyncClient(timeout=10) as client:
        forged = {"X-Ussy-Handle": "evil", "X-Ussy-User-Id": "u1", "X-Ussy-Whatever": "x", "X-Ussy-Access": "owner"}

        # public: served without auth, forged identity stripped, forwarding headers set by Caddy
        r = await client.get(
            st.url("/p?q=1"), headers={"Host": st.host("pub.localhost"), **forged, "X-Forwarded-Host": "evil.example"}
        )
        assert r.status_code == 200, r.text
        seen = r.json()["headers"]
        assert not [k for k in seen if k.startswith("x-ussy-")], seen
        assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == st.host("pub.localhost")

        # private, nobody: browser -> login redirect (with next), API client -> 401 JSON; the app is never reached
        r = await client.get(st.url("/x"), headers={"Host": st.host("web.localhost"), **HTML, **forged})
        assert r.status_code == 302 and r.headers["location"].startswith("http://localhost/__ussy/login?next=")
        assert "web.localhost" in r.headers["location"]
        r = await client.get(st.url("/x"), headers={"Host": st.host("web.localhost"), **forged})
        assert r.status_code == 401 and r.json()["code"] == 401

        # owner session: allowed, identity comes from forward-auth only
        r = await client.post(
            st.url("/submit?a=b"),
            content=b"payload",
            headers={"Host": st.host("web.localhost"), "Cookie": "sess=s-alice", **forged},
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["method"], got["body"], got["path"], got["query"]) == ("POST", "payload", "/submit", "a=b")
        h = got["headers"]
        assert (h["x-ussy-handle"], h["x-ussy-user-id"], h["x-ussy-email"], h["x-ussy-access"]) == (
            "alice",
            "u1",
            "alice@example.com",
            "owner",
        )
        assert "x-ussy-whatever" not in h

        # shared user without e-mail: no (empty) X-Ussy-Email, even if the client sent one
        r = await client.get(
            st.url("/"),
            headers={"Host": st.host("web.localhost"), "Cookie": "sess=s-carol", "X-Ussy-Email": "forged@example.com"},
        )
        h = r.json()["headers"]
        assert h["x-ussy-handle"] == "carol" and h["x-ussy-access"] == "shared" and "x-ussy-email" not in h, h.get(
            "x-ussy-email"
        )

        # signed in but not shared: 403
        r = await client.get(st.url("/"), headers={"Host": st.host("web.localhost"), "Cookie": "sess=s-bob", **HTML})
        assert r.status_code == 403 and "not shared with you" in r.text

        # Bearer: bad -> 401 JSON, good -> allowed
        r = await client.get(st.url("/"),
                             headers={"Host": st.host("web.localhost"), "Authorization": "Bearer usy1.nope"})
        assert r.status_code == 401 and r.json() == {"error": "invalid or expired token", "code": 401,
                                                  "reason": "bearer_invalid"}
        r = await client.get(
            st.url("/"), headers={"Host": st.host("web.localhost"), "Authorization": "Bearer usy1.good-token"}
        )
        assert r.status_code == 200 and r.json()["headers"]["x-ussy-access"] == "bearer"

        # share link: cookie + redirect without the param, then the cookie opens the VM
        r = await client.get(
            st.url("/page?ussy_share=link-token-1234&k=v"), headers={"Host": st.host("web.localhost"), **HTML}
        )
        assert r.status_code == 302 and r.headers["location"] == f"http://{st.host('web.localhost')}/page?k=v"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("ussy_share_vm1=link-token-1234;") and "HttpOnly" in cookie
        r = await client.get(
            st.url("/page?k=v"), headers={"Host": st.host("web.localhost"), "Cookie": "ussy_share_vm1=link-token-1234"}
        )
        assert r.status_code == 200 and r.json()["headers"]["x-ussy-access"] == "share-link"
        r = await client.get(
            st.url("/"), headers={"Host": st.host("web.localhost"), "Cookie": "ussy_share_vm1=bogus1234", **HTML}
        )
        assert r.status_code == 302 and "/__ussy/login" in r.headers["location"]

        # unknown host: the catch-all 404 page; the apex goes to the app server
        r = await client.get(st.url("/"), headers={"Host": st.host("nope.localhost")})
        assert r.status_code == 404 and "no such VM" in r.text
        r = await client.get(st.url("/__ussy/auth"), headers={"Host": st.host("localhost")})
        assert r.status_code == 404  # the auth app answered (Host is the apex, not a VM)


async def test_stopped_vm_answers_fast_with_a_page() -> None:
    async with stack(TlsMode.OFF) as st, httpx.AsyncClient(timeout=10) as client:
        st.runtime.stopped.add("vm2")
        t0 = time.monotonic()
        r = await client.get(st.url("/"), headers={"Host": st.host("pub.localhost")})
        assert r.status_code == 502 and "not answering" in r.text
        assert time.monotonic() - t0 < 2.0
        # a removed bridge (socket gone) is the same page
        await st.bridges.remove("vm2")
        r = await client.get(st.url("/"), headers={"Host": st.host("pub.localhost")})
        assert r.status_code == 502 and "not answering" in r.text


async def test_streaming_response_is_not_buffered() -> None:
    async with stack(TlsMode.OFF) as st, httpx.AsyncClient(timeout=10) as client:
        t0 = time.monotonic()
        async with client.stream("GET", st.url("/stream"), headers={"Host": st.host("pub.localhost")}) as r:
            it = r.aiter_raw()
            first = await it.__anext__()
            t_first = time.monotonic() - t0
            rest = b"".join([chunk async for chunk in it])
        assert first == b"first\n" and t_first < 0.8
        assert rest == b"second\n"


async def test_websocket_upgrade_passes_through_port_route() -> None:
    async with stack(TlsMode.OFF) as st:
        reader, writer = await asyncio.open_connection("127.0.0.1", st.port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: " + st.host("3000-web.localhost").encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        for message in (b"hello", b"ussy ws"):
            mask = os.urandom(4)
            writer.write(
                bytes([0x81, 0x80 | len(message)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(message))
            )
            frame = await asyncio.wait_for(reader.readexactly(2 + len(message)), 5)
            assert frame == bytes([0x81, len(message)]) + message
        writer.close()


async def test_reconcile_adds_replaces_removes_and_leaves_foreign_routes() -> None:
    async with stack(TlsMode.OFF) as st, httpx.AsyncClient(timeout=10) as client:
        admin = st.admin
        foreign = {
            "match": [{"host": ["foreign.localhost"]}],
            "handle": [{"handler": "static_response", "body": "foreign"}],
            "terminal": True,
        }
        foreign_tagged = {**foreign, "@id": "someone-else", "match": [{"host": ["other.localhost"]}]}
        await admin._request("PUT", f"{admin._routes_path}/0", foreign)
        await admin._request("PUT", f"{admin._routes_path}/0", foreign_tagged)

        http_addr = st.auth_url.split("/")[2]
        apex = build_route(Route(RouteKind.APEX, "localhost", http_addr, public=True))
        routes = st.routes()
        desired = [apex] + [build_route(r) for r in routes]
        assert not (await admin.reconcile(desired, build_catchall())).changed  # already in sync

        # web becomes public, pub goes away, new-vm appears
        web_public = Route(RouteKind.VM, "web.localhost", st.bridges.dial_address("vm1", 8080), public=True,
                           app=st.app)
        new = Route(RouteKind.VM, "new.localhost", st.bridges.dial_address("vm2", 8080), public=True, app=st.app)
        desired = [apex, build_route(web_public), build_route(routes[1]), build_route(new)]
        result = await admin.reconcile(desired, build_catchall())
        assert result.added == [new.route_id] and result.replaced == [web_public.route_id]
        assert result.removed == [routes[2].route_id]

        ids = [r.get("@id") for r in await admin.routes()]
        assert ids[-1] == CATCHALL_ID and "someone-else" in ids and None in ids
        assert set(await admin.our_routes()) == {d["@id"] for d in desired}

        h = lambda name: {"Host": st.host(name)}  # noqa: E731
        assert (await client.get(st.url("/"), headers=h("foreign.localhost"))).text == "foreign"
        assert (await client.get(st.url("/"), headers=h("other.localhost"))).text == "foreign"
        assert (await client.get(st.url("/"), headers=h("new.localhost"))).status_code == 200
        assert (await client.get(st.url("/"), headers=h("web.localhost"))).status_code == 200  # public now
        assert (await client.get(st.url("/"), headers=h("pub.localhost"))).status_code == 404  # removed

        # single-route operations
        assert await admin.put_route(build_route(routes[2])) == "added"
        assert await admin.put_route(build_route(routes[2])) == "unchanged"
        assert (await client.get(st.url("/"), headers=h("pub.localhost"))).status_code == 200
        assert await admin.delete_route(routes[2].route_id) is True
        assert await admin.delete_route(routes[2].route_id) is False
        with pytest.raises(ValueError):
            await admin.delete_route("someone-else")
        assert [r.get("@id") for r in await admin.routes()][-1] == CATCHALL_ID


class LoopbackBackend(httpcore.AsyncNetworkBackend):
    """Resolves every name to 127.0.0.1 (SNI and Host keep the real name), like curl --resolve."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp("127.0.0.1", port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


async def test_internal_tls_serves_https_with_caddys_local_ca() -> None:
    async with stack(TlsMode.INTERNAL) as st:
        deadline = time.monotonic() + 20
        while not st.caddy.root_ca_path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert st.caddy.root_ca_path.is_relative_to(st.base)  # the CA lives in our data dir
        ctx = ssl.create_default_context(cafile=str(st.caddy.root_ca_path))
        transport = httpx.AsyncHTTPTransport(verify=ctx)
        transport._pool = httpcore.AsyncConnectionPool(ssl_context=ctx, network_backend=LoopbackBackend())
        async with httpx.AsyncClient(transport=transport, timeout=20) as client:
            r = None
            for _ in range(50):  # the first certificate is issued on the first handshake
                try:
                    r = await client.get(f"https://pub.localhost:{st.port}/tls")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.2)
            assert r is not None and r.status_code == 200
            assert r.json()["headers"]["x-forwarded-proto"] == "https"
            r = await client.get(f"https://web.localhost:{st.port}/", headers={"Cookie": "sess=s-alice"})
            assert r.status_code == 200 and r.json()["headers"]["x-ussy-handle"] == "alice"
        with pytest.raises(httpx.ConnectError):  # and nothing else is trusted
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(verify=True)) as plain:
                await plain.get(f"https://127.0.0.1:{st.port}/")


async def test_start_failure_carries_caddys_log_tail() -> None:
    base = Path(tempfile.mkdtemp(prefix="uc", dir="/tmp"))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    caddy = ManagedCaddy(
        base / "caddy",
        build_config(ServerSettings(domain=DOMAIN, https_addr=f"127.0.0.1:{port}", tls=TlsMode.OFF)),
        ready_timeout=10,
    )
    try:
        with pytest.raises(RuntimeFailure) as info:
            await caddy.start()
        assert "address already in use" in info.value.evidence
        assert "caddy run --config" in info.value.evidence
    finally:
        blocker.close()
        await caddy.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_attach_to_existing_caddy_keeps_its_config() -> None:
    base = Path(tempfile.mkdtemp(prefix="uc", dir="/tmp"))
    other_port, our_port = free_port(), free_port()
    theirs = {
        "apps": {
            "http": {
                "servers": {
                    "theirs": {
                        "listen": [f"127.0.0.1:{other_port}"],
                        "automatic_https": {"disable": True},
                        "routes": [{"handle": [{"handler": "static_response", "body": "theirs"}]}],
                    }
                }
            }
        }
    }
    owner = ManagedCaddy(base / "caddy", theirs)
    admin = await owner.start()
    try:
        settings = ServerSettings(domain=DOMAIN, https_addr=f"127.0.0.1:{our_port}", tls=TlsMode.OFF)
        attached = ExternalCaddy(owner.admin_address, build_server(settings))
        ours = await attached.start()
        x = Route(RouteKind.VM, "x.localhost", "127.0.0.1:9", public=True, app="127.0.0.1:9")
        await ours.put_route(build_route(x))
        servers = await admin.get_config("apps/http/servers")
        assert set(servers) == {"theirs", "ussycode"}
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"http://127.0.0.1:{other_port}/")).text == "theirs"
            r = await client.get(f"http://127.0.0.1:{our_port}/", headers={"Host": "nope.localhost"})
            assert r.status_code == 404
        await attached.stop()
        assert owner.pid is not None and (await admin.ping())  # attaching never stops someone else's Caddy
        with pytest.raises(RuntimeFailure):
            await ExternalCaddy("unix//tmp/nonexistent-ussy.sock", {}).start()
    finally:
        await owner.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_config_json_round_trips() -> None:
    json.dumps(build_config(ServerSettings(domain=DOMAIN)))


async def _raw_request(port: int, head: str) -> dict[str, Any]:
    """One HTTP/1.1 request written by hand (duplicate headers, odd spacing), the JSON answer parsed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    assert b" 200 " in status_line, data[:300]
    body = rest.split(b"\r\n\r\n", 1)[1]
    if b"chunked" in rest.split(b"\r\n\r\n", 1)[0].lower():
        size, _, chunk = body.partition(b"\r\n")
        body = chunk[: int(size, 16)]
    return dict(json.loads(body))


@pytest.mark.parametrize(
    ("cookies", "kept"),
    [
        (["a=1; __Host-ussy_session=s3cret; b=2"], "a=1; b=2"),
        (["__Host-ussy_session=s3cret"], None),
        (["ussy_share_vm1=s3cret; theme=dark"], "theme=dark"),
        (["theme=dark;ussy_session=s3cret"], "theme=dark"),
        (["ussy_next=s3cret", "keep=me"], "keep=me"),  # two Cookie headers: ours goes, theirs stays
        (["  ussy_share_=s3cret ;x=1"], "x=1"),
        (["myussy_session=1; ussy_sessionx=2"], "myussy_session=1; ussy_sessionx=2"),  # not ours
    ],
)
async def test_our_cookies_never_reach_the_app(cookies: list[str], kept: str | None) -> None:
    async with stack(TlsMode.OFF) as st:
        lines = "".join(f"Cookie: {c}\n" for c in cookies)
        seen = await _raw_request(st.port, f"GET /c HTTP/1.1\nHost: {st.host('pub.localhost')}\n{lines}"
                                           "Connection: close\n")
        values = "; ".join(v for k, v in seen["raw_headers"] if k == "cookie")
        assert "s3cret" not in json.dumps(seen)
        assert [p.strip() for p in values.split(";") if p.strip()] == \
            ([] if kept is None else [p.strip() for p in kept.split(";")])


@pytest.mark.parametrize(
    ("authorization", "kept"),
    [
        (["Bearer usy1.abc.s3cret"], None),
        (["bearer   USY0.e30.s3cret"], None),
        (["Token usy1.abc.s3cret"], None),
        (["Basic dXNlcjpwYXNz"], "Basic dXNlcjpwYXNz"),
        (["Bearer app-own-token"], "Bearer app-own-token"),
        (["Basic dXNlcjpwYXNz", "Bearer usy1.abc.s3cret"], None),  # a platform token in any value: all go
    ],
)
async def test_platform_tokens_never_reach_the_app(authorization: list[str], kept: str | None) -> None:
    async with stack(TlsMode.OFF) as st:
        lines = "".join(f"Authorization: {a}\n" for a in authorization)
        seen = await _raw_request(st.port, f"GET /a HTTP/1.1\nHost: {st.host('pub.localhost')}\n{lines}"
                                           "Connection: close\n")
        assert "s3cret" not in json.dumps(seen)
        assert seen["headers"].get("authorization") == kept


async def test_underscore_headers_and_share_parameter_are_dropped() -> None:
    async with stack(TlsMode.OFF) as st:
        seen = await _raw_request(
            st.port,
            f"GET /q?a=1&ussy_share=s3cret&USSY_SHARE=theirs&ussy%5Fshare=s3cret&b=2 HTTP/1.1\n"
            f"Host: {st.host('pub.localhost')}\nX-Ussy_Handle: mallory\nx_ussy_access: owner\n"
            "X_USSY_USER_ID: u-mal\nMy_Header: x\nX-Ussy-Email: m@evil.test\nX-Normal: yes\nConnection: close\n",
        )
        headers = seen["headers"]
        assert not [k for k in headers if "_" in k or k.startswith("x-ussy")], headers
        assert headers["x-normal"] == "yes"
        assert "s3cret" not in json.dumps(seen)
        assert seen["path"] == "/q" and "a=1" in seen["query"] and "b=2" in seen["query"]
        assert "USSY_SHARE=theirs" in seen["query"]  # a different (case-sensitive) parameter: the app's


async def test_a_caddy_left_by_a_killed_server_is_replaced() -> None:
    """``kill -9`` of the server leaves its Caddy holding the port with an old config; the next start stops it."""
    base = Path(tempfile.mkdtemp(prefix="uc", dir="/tmp"))
    port = free_port()

    def config(body: str) -> dict[str, Any]:
        return {"apps": {"http": {"servers": {"s": {
            "listen": [f"127.0.0.1:{port}"], "automatic_https": {"disable": True},
            "routes": [{"handle": [{"handler": "static_response", "body": body}]}]}}}}}

    first = ManagedCaddy(base / "caddy", config("old"))
    await first.start()
    old_pid = first.pid
    assert old_pid is not None
    try:
        # A new server process: it knows nothing of the first Caddy but the files in its data dir.
        second = ManagedCaddy(base / "caddy", config("new"))
        await second.start()
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                assert (await client.get(f"http://127.0.0.1:{port}/")).text == "new"
            assert first._proc is not None and await asyncio.wait_for(first._proc.wait(), 5) is not None
            # A pid file naming someone else's process (a reused pid) is left alone.
            (base / "caddy" / "caddy.pid").write_text(f"{os.getpid()}\n")
            assert second._leftover_pid() is None
        finally:
            await second.stop()
    finally:
        await first.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _go_gc_settings(caddy: ManagedCaddy) -> dict[str, float]:
    """The garbage-collector settings the running Caddy reports on its admin ``/metrics``."""
    base_url, transport = admin_transport(caddy.admin_address)
    headers = {"Host": ""} if caddy.admin_address.startswith("unix/") else {}
    async with httpx.AsyncClient(base_url=base_url, transport=transport, timeout=5, headers=headers) as c:
        text = (await c.get("/metrics")).text
    wanted = ("go_gc_gogc_percent", "go_gc_gomemlimit_bytes")
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.split(" ")[0] in wanted}


@pytest.mark.parametrize("operator", [{}, {"GOGC": "150", "GOMEMLIMIT": "300MiB"}])
async def test_managed_caddy_runs_with_our_gc_settings_unless_the_operator_sets_them(
        operator: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOGC", "GOMEMLIMIT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in operator.items():
        monkeypatch.setenv(name, value)
    base = Path(tempfile.mkdtemp(prefix="uc", dir="/tmp"))
    caddy = ManagedCaddy(base / "caddy", build_config(ServerSettings(
        domain=DOMAIN, https_addr=f"127.0.0.1:{free_port()}", tls=TlsMode.OFF)))
    try:
        await caddy.start()
        seen = await _go_gc_settings(caddy)
        expected = go_runtime_env(operator, machine_memory())
        assert seen["go_gc_gogc_percent"] == float(expected["GOGC"])
        assert seen["go_gc_gomemlimit_bytes"] == float(expected["GOMEMLIMIT"].removesuffix("MiB")) * 2**20
        if not operator:
            assert seen["go_gc_gogc_percent"] == 400
            assert seen["go_gc_gomemlimit_bytes"] >= 256 * 2**20
        else:
            assert seen == {"go_gc_gogc_percent": 150, "go_gc_gomemlimit_bytes": 300 * 2**20}
    finally:
        await caddy.stop()
        shutil.rmtree(base, ignore_errors=True)


async def flood_unknown_hosts(debug_log: bool, requests: int = 400) -> tuple[list[str], float]:
    """A managed Caddy whose proxy looks each request's host up (as the public route does), flooded with anonymous
    requests to unknown hosts: (its log's lines, the flood's seconds)."""
    base = Path(tempfile.mkdtemp(prefix="uc", dir="/tmp"))
    port, closed = free_port(), free_port()
    config = {"apps": {"http": {"servers": {"s": {
        "listen": [f"127.0.0.1:{port}"], "automatic_https": {"disable": True},
        "routes": [{"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": f"127.0.0.1:{closed}"}],
                                "dynamic_upstreams": {"source": "a", "name": "{http.request.host}", "port": "8080",
                                                      "resolver": {"addresses": ["udp/127.0.0.1:1"]}}}]}],
        "errors": {"routes": [{"handle": [{"handler": "static_response", "status_code": 502}]}]}}}}}}
    caddy = ManagedCaddy(base / "caddy", config, debug_log=debug_log)
    try:
        admin = await caddy.start()
        assert await admin.get_config("logging") == caddy_logging(caddy.log_path, debug_log)
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(requests):
                r = await client.get(f"http://127.0.0.1:{port}/", headers={"Host": f"nosuch{i}.localhost"})
                assert r.status_code == 502
        seconds = time.monotonic() - started
        await asyncio.sleep(0.2)
        return caddy.log_path.read_text().splitlines(), seconds
    finally:
        await caddy.stop()
        shutil.rmtree(base, ignore_errors=True)


async def test_a_message_visitors_cause_on_every_request_cannot_fill_caddys_log() -> None:
    """An anonymous request to a private or unknown host fails its name lookup by design, and Caddy's proxy logs
    that (with ``--log-level DEBUG``, when its lines are kept): the managed Caddy's log keeps each message at most
    LOG_FIRST times a second, in a file Caddy rolls."""
    lines, seconds = await flood_unknown_hosts(debug_log=True)
    failed = [ln for ln in lines if "failed getting dynamic upstreams" in ln]
    assert 1 <= len(failed) <= LOG_FIRST * (int(seconds) + 2), (len(failed), seconds)
    roundtrips = [ln for ln in lines if '"msg":"upstream roundtrip"' in ln]
    assert 1 <= len(roundtrips) <= LOG_FIRST * (int(seconds) + 2), (len(roundtrips), seconds)


async def test_caddys_log_leaves_out_its_proxys_lines_unless_debugging() -> None:
    """By default the proxy's logger is a no-op (its per-request cost is gone and it writes nothing), while Caddy's
    own lines are still written."""
    lines, _ = await flood_unknown_hosts(debug_log=False, requests=50)
    assert not [ln for ln in lines if PROXY_LOGGER in ln], [ln for ln in lines if PROXY_LOGGER in ln][:3]
    assert any('"msg":"serving initial configuration"' in ln for ln in lines), lines[:5]

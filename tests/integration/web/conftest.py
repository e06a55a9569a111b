"""A real server with its managed Caddy (``--tls off`` on a free loopback port), a real VM running a small HTTP
app that echoes the request headers it receives, and a browser-like HTTP client (cookie jar per host) that
reaches ``*.localhost`` names on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from ussycode.runtime.container import ContainerRuntime
from ussycode.runtime.images import ImageStore
from ussycode.store import vms as vmq
from ussycode.tasks import TaskGroup

from ..conftest import free_port  # noqa: TID252

# The app inside the VM: answers every method on every path with the request it saw (JSON).
ECHO_APP = r'''
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"path": self.path, "method": self.command, "port": self.server.server_port,
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": self.rfile.read(n).decode(errors="replace")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = _answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
'''


@contextlib.asynccontextmanager
async def serve_local(app: Any, name: str) -> AsyncIterator[int]:
    """``app`` (ASGI: a stand-in provider) served by uvicorn on a free loopback port for the block; the port."""
    port = free_port()
    tasks = TaskGroup(name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    serving = tasks.spawn(server.serve(), name)
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
        await tasks.close()


def require_full_image(web: Any) -> None:
    """Skip unless the full image (``ussyuntu``, minutes to build) is in this server's image store."""
    try:
        ImageStore(web.server.app.settings.images_path).resolve("ussyuntu")
    except Exception:  # noqa: BLE001 - only where the full image is built
        pytest.skip("the full image is not built here (ussycode image build --name ussyuntu)")


class LoopbackTransport(httpx.AsyncBaseTransport):
    """Sends every request to 127.0.0.1 (same port), keeping the Host header: ``*.localhost`` without DNS."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url.copy_with(host="127.0.0.1")
        inner = httpx.Request(request.method, url, headers=request.headers, stream=request.stream,
                              extensions=request.extensions)
        return await self._inner.handle_async_request(inner)

    async def aclose(self) -> None:
        await self._inner.aclose()


def browser_client(**kw: Any) -> httpx.AsyncClient:
    """A cookie-keeping client that does not follow redirects (tests look at each hop)."""
    return httpx.AsyncClient(transport=LoopbackTransport(), timeout=20, follow_redirects=False, **kw)


@dataclass
class Web:
    server: Any
    port: int

    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}:{self.port}{path}"

    async def cmd(self, key: Path, *args: str) -> Any:
        return await self.server.ssh(key, *args)

    async def login_url(self, key: Path) -> str:
        r = await self.server.ssh(key, "browser")
        assert r.exit_status == 0, r
        match = re.search(r"https?://\S+/__ussycode/login\?token=\S+", r.stdout)
        assert match, r.stdout
        return match.group(0)

    async def new_vm(self, key: Path, name: str, ports: tuple[int, ...] = (8080,)) -> dict[str, Any]:
        r = await self.server.ssh(key, "new", f"--name={name}", "--json", timeout=180)
        assert r.exit_status == 0, r
        for port in ports:
            await self.serve_echo(key, name, port)
        return dict(json.loads(r.stdout))

    async def serve_echo(self, key: Path, vm: str, port: int) -> None:
        r = await self.server.ssh(key, f"cat > /tmp/echo.py && (setsid nohup python3 /tmp/echo.py {port} "
                                  ">/tmp/echo-{port}.log 2>&1 &) ; for i in $(seq 50); do "
                                  f"python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))' "
                                  "2>/dev/null && exit 0; sleep 0.1; done; exit 1",
                                  user=vm, stdin=ECHO_APP.encode())
        assert r.exit_status == 0, r


async def agent_state(server: Any, key: Path, vm: str) -> str:
    """The state of ``vm``'s agent run as ``ls --json`` shows it ("" when it has none)."""
    listing = json.loads((await server.ssh(key, "ls", "--json")).stdout)
    return str(next(v for v in listing if v["name"] == vm).get("agent", {}).get("state", ""))


async def agent_finished(server: Any, key: Path, vm: str, seconds: int = 120) -> str:
    """Poll ``ls --json`` once a second until ``vm``'s agent is no longer running (at most ``seconds``); its state."""
    for _ in range(seconds):
        state = await agent_state(server, key, vm)
        if state != "running":
            return state
        await asyncio.sleep(1)
    return await agent_state(server, key, vm)


@pytest.fixture
def needs_vms(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


@pytest.fixture
async def web_factory(server_factory: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    started: list[Web] = []

    async def start(data_dir: Path | None = None, port: int | None = None, **overrides: Any) -> Web:
        port = port or free_port()
        overrides.setdefault("tls", "off")
        server = await server_factory(data_dir, https_addr=f"127.0.0.1:{port}", **overrides)
        https = server.app.https
        assert https is not None and not https.error, https.error if https else "no https entry"
        started.append(Web(server, port))
        return started[-1]

    yield start
    # VMs outlive a server stop by design: destroy the ones the test made (newest server first).
    done: set[str] = set()
    for web in reversed(started):
        services = web.server.app.services
        if services is None or web.server.app.https is None or web.server.app.https.tasks is None:
            continue
        try:
            vms = await services.store.read(vmq.all_vms)
        except Exception:  # noqa: BLE001 - the store of a stopped server is closed
            continue
        for vm in vms:
            if vm.id not in done:
                done.add(vm.id)
                await services.vms.runtime.destroy(vm.id)


@pytest.fixture
async def web(web_factory: Callable[..., Any]) -> Web:
    w: Web = await web_factory()
    return w

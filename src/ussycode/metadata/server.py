"""The metadata service a VM reaches at ``http://169.254.169.254/``.

Each running VM gets its own listener, made by the runtime inside that VM's network namespace
(:meth:`Runtime.open_listener`) and served by this process: who is asking is known from which listener took the
connection, never from anything the guest sends, so a VM cannot read another VM's metadata.

Endpoints (JSON unless noted): ``GET /`` (the VM: name, domain, URL, owner, image, sizes, env), ``GET /hostname``
(plain text) and ``POST /gateway/email/send`` (mail to the owner or a sharee: :mod:`ussycode.services.outbox`).
It is a Starlette app served by uvicorn (the same stack as the app server), one uvicorn server per VM listener,
which stamps the VM's id into every request it accepts. Requests are bounded in size (``MAX_REQUEST`` of headers,
``MAX_BODY`` of body) and time (``REQUEST_TIMEOUT`` per connection, then it is closed whatever the guest does), and
answered with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ussycode import telemetry
from ussycode.errors import RateLimited, UssyError
from ussycode.metadata.llm import KEEP_OPEN, gateway
from ussycode.runtime.netns import METADATA_V4
from ussycode.services.container import Services
from ussycode.services.events import VmEvent
from ussycode.store import vms as vmq
from ussycode.store.schema import iso
from ussycode.store.users import by_id as user_by_id
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)
PORT = 80
MAX_REQUEST = 16 * 1024
MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 10.0
VM_ID = "ussycode.vm_id"  # the scope key the per-VM server sets; nothing a guest sends can set it
CLOSE = {"Connection": "close"}


class _BoundedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline per connection: a guest that sends slowly (or nothing)
    is cut off after REQUEST_TIMEOUT, as uvicorn itself only times out idle keep-alive connections."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT, transport.close)

    def handle_events(self) -> None:
        super().handle_events()
        # A request whose headers arrived in time may ask for longer (an LLM answer streams for minutes): the
        # scope carries the way to do it; the guest can set nothing in it.
        if self.scope is not None and KEEP_OPEN not in self.scope:
            self.scope[KEEP_OPEN] = self._keep_open  # type: ignore[literal-required]

    def _keep_open(self, seconds: float) -> None:
        self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn without signal handling (the App owns SIGTERM/SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=CLOSE)


def build_metadata_app(services: Services) -> Starlette:
    """The ASGI app; it answers only requests that carry the VM id its per-VM server stamped."""

    async def info(request: Request) -> Response:
        vm = await services.vms.by_id(request.scope[VM_ID])
        if vm is None:
            return _json(404, {"error": "this VM no longer exists"})
        owner = await services.store.read(lambda c: user_by_id(c, vm.owner_id))
        spec = services.vms.spec(vm)
        data: dict[str, Any] = {
            "name": vm.name, "domain": services.settings.domain, "url": services.vms.url(vm.name),
            "ssh": services.vms.ssh_command(vm.name), "owner": owner.handle if owner else None,
            "owner_email": owner.email if owner else None,  # verified only; the one mail from the VM may go to
            "image": vm.image, "cpu": vm.cpu, "memory_mb": vm.memory_mb, "disk_gb": vm.disk_gb,
            "tags": list(vm.tags), "created_at": iso(vm.created_at), "env": spec.env,
        }
        return Response(json.dumps(data, indent=2) + "\n", media_type="application/json", headers=CLOSE)

    async def env(request: Request) -> Response:
        """KEY=VALUE lines for shells and agents: the VM's USSYCODE_* values and the gateway's base URLs (the
        placeholder keys are not secrets: the gateway ignores them and adds the owner's)."""
        vm = await services.vms.by_id(request.scope[VM_ID])
        if vm is None:
            return _json(404, {"error": "this VM no longer exists"})
        values = {k: v for k, v in services.vms.spec(vm).env.items() if k.startswith("USSYCODE_")}
        values.update(agent_env())
        text = "".join(f"{k}={v}\n" for k, v in sorted(values.items()))
        return PlainTextResponse(text, headers=CLOSE)

    async def agent_state(request: Request) -> Response:
        """The VM's agent run (``new --prompt``) ended: ``{"state": "done"|"failed"}``."""
        if services.agents is None:
            return _json(503, {"error": "not available", "code": 503})
        body = await request.body()
        try:
            doc = json.loads(body) if len(body) <= 1024 else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        state, run = doc.get("state"), doc.get("run", "agent")
        if state not in ("done", "failed") or run not in ("agent", "setup"):
            return _json(400, {"error": 'expected {"state": "done"|"failed"[, "run": "setup"]}', "code": 400})
        if not await services.agents.report(request.scope[VM_ID], state, run):
            return _json(404, {"error": "no agent run to report on in this VM", "code": 404})
        return _json(200, {"state": state})

    async def hostname(request: Request) -> Response:
        vm = await services.vms.by_id(request.scope[VM_ID])
        if vm is None:
            return _json(404, {"error": "this VM no longer exists"})
        return PlainTextResponse(vm.name + "\n", headers=CLOSE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _json(405, {"error": "method not allowed here (GET for metadata, POST for /gateway/email/send)"})
        if exc.status_code == 404:
            return _json(404, {"error": "not found; try / or /hostname"})
        return _json(exc.status_code, {"error": str(exc.detail)})

    async def send_email(request: Request) -> Response:
        if services.outbox is None:
            return _json(503, {"error": "mail is not available on this server", "code": 503})
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _json(413, {"error": f"body over {MAX_BODY // 1024} KiB", "code": 413})
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _json(400, {"error": 'the body must be JSON: {"to","subject","body"[,"html"]}', "code": 400})
        fields = ("to", "subject", "body")
        if (not isinstance(doc, dict) or set(doc) - {*fields, "html"}
                or not all(isinstance(doc.get(k), str) for k in fields)
                or not isinstance(doc.get("html", ""), str)):
            return _json(400, {"error": 'expected {"to","subject","body"[,"html"]}, all strings', "code": 400})
        try:
            to = await services.outbox.send_from_vm(request.scope[VM_ID], doc["to"], doc["subject"], doc["body"],
                                                    doc.get("html"))
        except UssyError as exc:
            headers = dict(CLOSE)
            if isinstance(exc, RateLimited):
                headers["Retry-After"] = str(int(exc.retry_after))
            return JSONResponse({"error": exc.user_message, "code": exc.http_status}, status_code=exc.http_status,
                                headers=headers)
        return _json(200, {"status": "sent", "to": to})

    methods = ["GET", "HEAD"]
    routes = [Route(path, info, methods=methods) for path in ("/", "/v1", "/v1/")]
    routes.append(Route("/hostname", hostname, methods=methods))
    routes.append(Route("/gateway/email/send", send_email, methods=["POST"]))
    routes.append(Route("/env", env, methods=methods))
    routes.append(Route("/agent/state", agent_state, methods=["POST"]))
    routes.append(Route("/gateway/llm/{provider}/{path:path}", gateway(services, VM_ID),
                        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def agent_env(host: str = METADATA_V4) -> dict[str, str]:
    """What SDKs and agents need to use the gateway; no real key."""
    base = f"http://{host}/gateway/llm"
    return {"OPENAI_BASE_URL": f"{base}/openai/v1", "ANTHROPIC_BASE_URL": f"{base}/anthropic",
            "OPENAI_API_KEY": "ussycode-gateway", "ANTHROPIC_API_KEY": "ussycode-gateway",
            "USSYCODE_LLM_GATEWAY": base}


def _for_vm(app: ASGIApp, vm_id: str) -> ASGIApp:
    async def stamped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan, no websockets
        with telemetry.span("metadata request", path=str(scope.get("path", ""))[:64]):
            await app({**scope, VM_ID: vm_id}, receive, send)

    return stamped


class MetadataService:
    def __init__(self, services: Services, host: str = METADATA_V4, port: int = PORT) -> None:
        self.services = services
        self.host = host
        self.port = port
        self.app = build_metadata_app(services)
        self._servers: dict[str, _Server] = {}
        self._tasks = TaskGroup("metadata")
        self._unsupported_logged = False

    async def start(self) -> None:
        """Listen for every running VM, and follow VMs as they start and stop."""
        self.services.events.subscribe(self._on_event)
        for vm_id in await self.services.store.read(_running_vms):
            if self.services.vms.pending(vm_id) is None:  # one re-attaching says "started" when it is done
                await self._ensure(vm_id)

    async def stop(self) -> None:
        for vm_id in list(self._servers):
            await self._close(vm_id)
        await self._tasks.drain(3.0)  # each server notices should_exit within 0.1 s and closes its listener
        await self._tasks.close()

    def listening(self, vm_id: str) -> bool:
        return vm_id in self._servers

    async def _on_event(self, event: VmEvent) -> None:
        if event.kind == "started":
            await self._ensure(event.vm_id)
        elif event.kind in ("stopped", "removed"):
            await self._close(event.vm_id)

    async def _ensure(self, vm_id: str) -> None:
        if vm_id in self._servers:
            await self._close(vm_id)  # a restarted VM has a new namespace: the old socket is dead
        runtime = self.services.vms.runtime
        try:
            sock = await runtime.open_listener(vm_id, self.host, self.port)
        except NotImplementedError as exc:
            if not self._unsupported_logged:
                log.info("no metadata service for %s VMs: %s", runtime.name, exc)
                self._unsupported_logged = True
            return
        except Exception:
            log.exception("metadata listener for VM %s failed", vm_id)
            return
        config = uvicorn.Config(_for_vm(self.app, vm_id), lifespan="off", log_config=None, access_log=False,
                                server_header=False, date_header=False, proxy_headers=False, http=_BoundedH11,
                                h11_max_incomplete_event_size=MAX_REQUEST, timeout_keep_alive=1,
                                limit_concurrency=32, timeout_graceful_shutdown=1)
        server = _Server(config)
        self._servers[vm_id] = server
        self._tasks.spawn(server.serve(sockets=[sock]), f"metadata {vm_id}")

    async def _close(self, vm_id: str) -> None:
        server = self._servers.pop(vm_id, None)
        if server is not None:
            server.should_exit = True


def _running_vms(c: sa.Connection) -> list[str]:
    return list(vmq.running_names(c))


"""The Starlette application. Routes are grouped by feature; each module adds its own with ``routes()``."""

from __future__ import annotations

import datetime as dt
import re
import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ussycode import __version__, telemetry
from ussycode.api import web
from ussycode.api.docs import docs_routes
from ussycode.api.exec import exec_routes
from ussycode.api.openapi import openapi_routes
from ussycode.services.container import Services


async def health(request: Request) -> JSONResponse:
    """200 while every entry works; 503 when the HTTPS entry (Caddy) is down or being restarted."""
    body: dict[str, object] = {"status": "ok", "version": __version__,
                               "time": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}
    routes = request.app.state.services.routes
    if routes is not None and routes.health is not None:
        https = routes.health()
        body["https"] = https
        if https.get("state") != "running":
            body["status"] = "degraded"
            return JSONResponse(body, status_code=503)
    return JSONResponse(body)


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Observed:
    """Every request of the app server: a request id (the client's ``X-Request-Id`` when it is sane, else a new
    one; echoed back and put on every log line), a count and a duration by route class and status, a span."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = telemetry.route_class(scope.get("path", ""))
        sent = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        rid = sent if _REQUEST_ID_RE.fullmatch(sent) else telemetry.new_request_id()
        token = telemetry.request_id.set(rid)
        status = 500
        started = time.monotonic()

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            with telemetry.span(f"HTTP {scope.get('method', '')} {route}", route=route):
                await self.app(scope, receive, tagged)
        finally:
            telemetry.HTTP_REQUESTS.labels(route, str(status)).inc()
            telemetry.HTTP_SECONDS.labels(route).observe(time.monotonic() - started)
            telemetry.request_id.reset(token)


def build_app(services: Services, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    routes: list[BaseRoute] = [Route("/health", health, methods=["GET"]), *exec_routes(), *openapi_routes()]
    routes += web.routes()  # forward-auth (api/auth_endpoint.py), sign-in, logout, landing page, TLS ask
    routes += docs_routes()  # the built-in docs as HTML
    routes += extra_routes or []
    app = Starlette(routes=routes, middleware=[Middleware(Observed)])
    app.state.services = services
    return app

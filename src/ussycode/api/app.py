"""The Starlette application. Routes are grouped by feature; each module adds its own with ``routes()``."""

from __future__ import annotations

import datetime as dt

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from ussycode import __version__
from ussycode.api import web
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


def build_app(services: Services, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    routes: list[BaseRoute] = [Route("/health", health, methods=["GET"]), *exec_routes(), *openapi_routes()]
    routes += web.routes()  # forward-auth, sign-in, logout, landing page, TLS ask (api/web.py)
    routes += extra_routes or []
    app = Starlette(routes=routes)
    app.state.services = services
    return app

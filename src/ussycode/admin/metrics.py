"""The operators' address (``--admin-addr``, loopback by default): Prometheus ``/metrics`` and ``/health``.

Not behind Caddy and without sign-in, like any Prometheus target: keep it on loopback or a private interface.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ussycode import __version__, telemetry
from ussycode.services.container import Services


def ops_app(services: Services) -> Starlette:
    async def metrics(request: Request) -> Response:
        stats = await services.admin.instance_stats() if services.admin is not None else {}
        return Response(telemetry.render(stats), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def index(request: Request) -> Response:
        return PlainTextResponse("ussycode operators' address: /metrics (Prometheus), /health. The admin panel is "
                                 f"{services.settings.public_url(services.settings.domain)}/admin/\n")

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"]), Route("/health", health, methods=["GET"]),
                             Route("/", index, methods=["GET"])])

"""``GET /docs/`` and ``/docs/<topic>`` on the apex: the built-in docs as HTML (the same files ``doc`` shows)."""

from __future__ import annotations

from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ussycode import docs

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
CSS = ("body{font:16px/1.55 system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em;color:#1b1b1b}"
       "nav a{margin-right:1em}pre{background:#f4f4f4;padding:.8em;overflow:auto}code{background:#f4f4f4}"
       "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    nav = " ".join(f"<a href='/docs/{t}'>{escape(t)}</a>" for t in docs.topics())
    html = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)} · ussycode docs</title>"
            f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
            f"<nav><a href='/docs/'><b>docs</b></a> {nav}</nav>{body}</body></html>\n")
    return HTMLResponse(html, status, headers=HEADERS)


async def index(request: Request) -> Response:
    items = "".join(f"<li><a href='/docs/{t}'>{escape(docs.title(t))}</a> <code>doc {escape(t)}</code></li>"
                    for t in docs.topics())
    return _page("Docs", f"<h1>ussycode docs</h1><p>The same pages as <code>doc &lt;topic&gt;</code> in the "
                         f"lobby.</p><ul>{items}</ul>")


async def topic(request: Request) -> Response:
    name = request.path_params["topic"]
    if name not in docs.topics():
        return _page("Not found", "<h1>No such page</h1><p><a href='/docs/'>All topics</a></p>", 404)
    return _page(docs.title(name), docs.html(name))


async def bare(request: Request) -> Response:
    return RedirectResponse("/docs/", 308)


def docs_routes() -> list[BaseRoute]:
    return [Route("/docs", bare, methods=["GET"]), Route("/docs/", index, methods=["GET"]),
            Route("/docs/{topic}", topic, methods=["GET"])]

"""The front door's Caddy config: static, the same for every VM (pure builders, no I/O).

No VM change (create, start, stop, rename, rm, share) ever changes Caddy's config, so Caddy never reloads
because of one and no in-flight request, stream or WebSocket is cut. The routing table lives in the app
server (forward-auth names the upstream) and, for public hosts, in files (:mod:`ussycode.proxy.hosts`).

Routes of our server, in order:

1. ``ussycode-apex`` — the domain itself -> the app server (API, ``/exec``, sign-in).
2. ``ussycode-public`` — a host with a marker ``<hosts>/public/<host>`` (a public URL of a running VM) -> its
   forwarder socket ``<hosts>/sockets/<host>``, with no Python on the path. Only a request carrying our session
   cookie asks forward-auth, for the visitor's identity headers (anonymous visitors stay fast).
3. ``ussycode-vms`` — every other host -> forward-auth, which decides access for private URLs, answers unknown
   hosts (404) and stopped VMs (a page) itself, and on "allow" names the VM's forwarder socket in the
   ``X-Ussy-Upstream`` response header; Caddy keeps it in a variable and dials it.

Both VM routes run the trust boundary's handler chain (:mod:`ussycode.proxy.hygiene`, in its order): strip
client identity headers in every spelling, ``/__ussycode/*`` to the app server, the access decision, strip our
credentials, proxy. A 502/504 from a VM (nothing listens on the port) becomes a
page (HTML for browsers, JSON otherwise) in the server's error routes.

TLS: ``--tls internal`` keeps a wildcard certificate ``*.<domain>`` (and the apex) from Caddy's local CA, so
every VM URL, every port URL and unknown hosts complete a handshake; custom domains get on-demand
certificates. ``--tls acme``: the apex is managed, every other name gets an on-demand certificate only if the
permission endpoint (``tls-ask``) approves it (existing VM hosts, their port hosts, verified custom domains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ussycode.proxy.hygiene import ours_route, strip_client_identity, strip_platform_credentials
from ussycode.proxy.routes import (
    JSON,
    SERVER_NAME,
    Route,
    RouteKind,
    ServerSettings,
    TlsMode,
    build_route,
    build_tls_app,
    forward_auth_handler,
    listen_address,
    proxy_handler,
)

UPSTREAM_HEADER = "X-Ussy-Upstream"
UPSTREAM_VAR = "ussy_upstream"
PUBLIC_ROUTE_ID = "ussycode-public"
VMS_ROUTE_ID = "ussycode-vms"
# Streams (WebSockets) stay open this long after a config unload (only an attached Caddy's own reloads).
STREAM_CLOSE_DELAY = "24h"
# Our session cookie (``__Host-`` prefixed unless --tls off): a public VM asks forward-auth only when present.
SESSION_COOKIE_RE = r"(^|;)[ \t]*(__Host-)?ussy_session="
# Host names the fast path may turn into a file name (anything else goes through forward-auth).
FAST_HOST_RE = r"^[a-z0-9][a-z0-9.-]*$"

NOT_ANSWERING_HTML = (
    "<!doctype html><html><head><meta charset=utf-8><title>Nothing answers on this port</title></head><body>"
    "<h1>The VM is running, but nothing answers on this port</h1>"
    "<p>Start your app inside the VM listening on <code>0.0.0.0:8080</code> (or on the port in the URL, "
    "3000&ndash;9999). Check it from the VM with <code>curl localhost:8080</code>.</p></body></html>\n"
)
NOT_ANSWERING_JSON = (
    '{"error": "the VM is running but nothing answers on this port", "code": 502, "reason": "no_listener"}'
)


@dataclass(frozen=True)
class FrontSettings:
    """What the static VM routes need besides :class:`ServerSettings`.

    ``auth_url``: the forward-auth endpoint (with its key); ``public_markers``/``public_dial``: the
    :class:`~ussycode.proxy.hosts.PublicHosts` directory Caddy checks and the dial template for it.
    """

    auth_url: str
    public_markers: str
    public_dial: str


def vm_chain(upstream: str, app: str, decision: JSON | None, proxy_key: str = "") -> list[JSON]:
    """The handler chain of every VM route, in the trust boundary's order (:mod:`ussycode.proxy.hygiene`):
    strip client identity headers, ``/__ussycode/*`` to the app server, the access step (``decision``:
    forward-auth, or None), strip our credentials, proxy to ``upstream``."""
    handle: list[JSON] = [strip_client_identity(), ours_route(app, proxy_key)]
    if decision is not None:
        handle.append(decision)
    proxy = proxy_handler(upstream)
    proxy["stream_close_delay"] = STREAM_CLOSE_DELAY
    handle += [strip_platform_credentials(), proxy]
    return handle


def forward_auth_with_upstream(auth_url: str, proxy_key: str = "") -> JSON:
    """forward-auth whose 2xx answer also carries the upstream (kept in ``{http.vars.ussy_upstream}``)."""
    handler = forward_auth_handler(auth_url, proxy_key=proxy_key)
    routes: list[JSON] = handler["handle_response"][0]["routes"]
    routes.insert(0, {"handle": [{"handler": "vars",
                                  UPSTREAM_VAR: "{http.reverse_proxy.header." + UPSTREAM_HEADER + "}"}]})
    return handler


def identity_if_signed_in(auth_url: str, proxy_key: str = "") -> JSON:
    """On a public host: ask forward-auth only when the request carries our session cookie."""
    return {
        "handler": "subroute",
        "routes": [
            {
                "match": [{"header_regexp": {"Cookie": {"pattern": SESSION_COOKIE_RE}}}],
                "handle": [forward_auth_handler(auth_url, proxy_key=proxy_key)],
            }
        ],
    }


def build_public_route(settings: ServerSettings, front: FrontSettings) -> JSON:
    return {
        "@id": PUBLIC_ROUTE_ID,
        "match": [
            {
                "vars_regexp": {"{http.request.host}": {"pattern": FAST_HOST_RE}},
                "file": {"root": front.public_markers, "try_files": ["/{http.request.host}"]},
            }
        ],
        "handle": vm_chain(front.public_dial, settings.http_addr,
                           identity_if_signed_in(front.auth_url, settings.proxy_key), settings.proxy_key),
        "terminal": True,
    }


def build_vms_route(settings: ServerSettings, front: FrontSettings) -> JSON:
    return {
        "@id": VMS_ROUTE_ID,
        "handle": vm_chain("{http.vars." + UPSTREAM_VAR + "}", settings.http_addr,
                           forward_auth_with_upstream(front.auth_url, settings.proxy_key), settings.proxy_key),
        "terminal": True,
    }


def _static(status: int | str, content_type: str, body: str) -> JSON:
    return {"handler": "static_response", "status_code": status,
            "headers": {"Content-Type": [content_type], "Cache-Control": ["no-store"]}, "body": body}


def build_front_errors(domain: str) -> JSON:
    """A 502/503/504 from a VM (its forwarder connected, nothing listens, or it timed out) -> a clear page."""
    vm_down: JSON = {"vars": {"{http.error.status_code}": ["502", "503", "504"]}, "not": [{"host": [domain]}]}
    return {
        "routes": [
            {
                "match": [{**vm_down, "header": {"Accept": ["*text/html*"]}}],
                "handle": [_static(502, "text/html; charset=utf-8", NOT_ANSWERING_HTML)],
                "terminal": True,
            },
            {
                "match": [vm_down],
                "handle": [_static(502, "application/json", NOT_ANSWERING_JSON)],
                "terminal": True,
            },
            {
                "handle": [_static("{http.error.status_code}", "text/plain; charset=utf-8",
                                   "{http.error.status_code} {http.error.status_text}\n")],
                "terminal": True,
            },
        ]
    }


def build_front_server(settings: ServerSettings, front: FrontSettings) -> JSON:
    """Our HTTP server: apex, public fast path, every other host through forward-auth."""
    apex = build_route(Route(RouteKind.APEX, settings.domain, settings.http_addr, public=True,
                             proxy_key=settings.proxy_key))
    server: JSON = {
        "listen": [listen_address(settings.https_addr)],
        "routes": [apex, build_public_route(settings, front), build_vms_route(settings, front)],
        "errors": build_front_errors(settings.domain),
    }
    if settings.tls is TlsMode.OFF:
        server["automatic_https"] = {"disable": True}
    else:
        # TLS on our listener whatever its port; never start an :80 redirect server.
        server["tls_connection_policies"] = [{}]
        server["automatic_https"] = {"disable_redirects": True}
    return server


def build_front_apps(settings: ServerSettings) -> dict[str, Any]:
    """The ``tls`` and ``pki`` apps (none with --tls off)."""
    tls_app = build_tls_app(settings)
    if tls_app is None:
        return {}
    # Never try to install our local CA into the host's trust stores.
    return {"tls": tls_app, "pki": {"certificate_authorities": {"local": {"install_trust": False}}}}


def build_front_config(settings: ServerSettings, front: FrontSettings) -> JSON:
    """A complete Caddy config for a managed Caddy (``caddy run --config``)."""
    config: JSON = {
        "admin": {"config": {"persist": False}},
        "apps": {"http": {"grace_period": settings.grace_period,
                          "servers": {SERVER_NAME: build_front_server(settings, front)}}},
    }
    if settings.admin_listen:
        config["admin"]["listen"] = settings.admin_listen
    if settings.storage_dir:
        config["storage"] = {"module": "file_system", "root": settings.storage_dir}
    apps = build_front_apps(settings)
    if apps:
        config["apps"].update(apps)
        _, _, port = settings.https_addr.rpartition(":")
        config["apps"]["http"]["https_port"] = int(port)
    return config

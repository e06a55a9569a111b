"""Pure builders: :class:`Route` and :class:`ServerSettings` -> Caddy JSON. No I/O here.

Every route we own carries ``@id`` = ``ussycode-<kind>-<host>`` so the admin client can find, replace and
delete it without touching anyone else's routes. A VM route (VM URL, port URL, custom domain), in order
(the trust-boundary steps are :mod:`ussycode.proxy.hygiene`):

1. drops client-sent identity headers in every spelling and every header with an underscore;
2. sends ``/__ussycode/*`` to the app server (ours on every host, never the VM's);
3. for a private route, asks the forward-auth endpoint (Caddy's ``forward_auth`` Caddyfile directive, expanded
   by hand because Caddy's JSON has no such handler: a ``reverse_proxy`` with ``rewrite`` GET + URI and a
   ``handle_response`` for 2xx that copies the identity headers onto the request). Any non-2xx answer (login
   redirect, 401 JSON, 403, 404, share-link cookie redirect) goes back to the client as is;
4. removes our credentials (platform tokens, our cookies, ``ussy_share``);
5. proxies to the upstream (a port bridge's unix socket); Caddy sets ``X-Forwarded-*`` from what it saw.

The apex route drops client identity headers and proxies to the app server with the client's address.
The server config ends with a catch-all route (``ussycode-catchall``, unknown host -> 404) and an error
handler that turns a 502 from a VM route (the bridge refused: VM stopped or nothing listening) into a page.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ussycode.proxy.hygiene import (
    app_proxy_handler,
    client_address_headers,
    ours_route,
    strip_client_identity,
    strip_platform_credentials,
)

JSON = dict[str, Any]

ROUTE_ID_PREFIX = "ussycode-"
CATCHALL_ID = "ussycode-catchall"
SERVER_NAME = "ussycode"

# Headers forward-auth may set on the request to the VM. Client-sent copies never get through.
IDENTITY_HEADERS = ("X-Ussy-User-Id", "X-Ussy-Handle", "X-Ussy-Email", "X-Ussy-Access")

_HOST_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")

NOT_FOUND_HTML = (
    "<!doctype html><html><head><title>No such VM</title></head><body>"
    "<h1>404 &mdash; no such VM</h1><p>Nothing is served at this address. Check the name with "
    "<code>ls</code> in the ussycode lobby.</p></body></html>\n"
)
VM_DOWN_HTML = (
    "<!doctype html><html><head><title>VM not answering</title></head><body>"
    "<h1>This VM is not answering</h1><p>The VM is stopped, or nothing listens on this port inside it. "
    "Start it with <code>start &lt;vm&gt;</code> in the ussycode lobby, and make sure your app listens on "
    "<code>0.0.0.0:8080</code> (or the port in the URL).</p></body></html>\n"
)


class RouteKind(enum.StrEnum):
    VM = "vm"  # <vm>.<domain> -> the VM's port 8080
    PORT = "port"  # <port>-<vm>.<domain> -> another port of the VM
    CNAME = "cname"  # a verified custom domain -> the VM's port 8080
    APEX = "apex"  # <domain> -> the app server (API, login, forward-auth)


class TlsMode(enum.StrEnum):
    INTERNAL = "internal"
    ACME = "acme"
    OFF = "off"


def valid_host(host: str) -> bool:
    """A lower-case ASCII DNS name (punycode allowed), no port, no trailing dot."""
    return bool(_HOST_RE.fullmatch(host))


@dataclass(frozen=True)
class Route:
    """One host served by Caddy.

    ``upstream`` is a Caddy dial address: ``unix//abs/path.sock`` for a port bridge, ``127.0.0.1:8080`` for
    the app server. ``auth_url`` is the forward-auth endpoint (``http://127.0.0.1:8080/__ussy/auth``); it is
    required unless the route is public. Apex routes are always "public" at this layer: the app server does
    its own auth. ``app`` is the app server's dial address (VM routes send ``/__ussycode/*`` there; required
    for them); ``proxy_key`` is the per-start secret Caddy sends with the client's address to the app server.
    """

    kind: RouteKind
    host: str
    upstream: str
    public: bool = False
    auth_url: str = ""
    app: str = ""
    proxy_key: str = ""

    def __post_init__(self) -> None:
        if not valid_host(self.host):
            raise ValueError(f"not a valid route host: {self.host!r}")
        if not self.upstream:
            raise ValueError("a route needs an upstream dial address")
        if not self.public and self.kind is not RouteKind.APEX:
            auth_target(self.auth_url)  # raises on a bad or missing URL: fail closed at build time
        if self.kind is not RouteKind.APEX and not self.app:
            raise ValueError("a VM route needs the app server's address for /__ussycode/*")

    @property
    def route_id(self) -> str:
        return f"{ROUTE_ID_PREFIX}{self.kind.value}-{self.host}"

    @property
    def needs_auth(self) -> bool:
        return not self.public and self.kind is not RouteKind.APEX


def auth_target(url: str) -> tuple[str, str]:
    """Split a forward-auth URL into (Caddy dial address, request URI). Only plain http on a host:port."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc or not parts.path.startswith("/"):
        raise ValueError(f"forward-auth URL must look like http://127.0.0.1:8080/path, got {url!r}")
    dial = parts.netloc if parts.port else f"{parts.netloc}:80"
    uri = parts.path + (f"?{parts.query}" if parts.query else "")
    return dial, uri


def forward_auth_handler(auth_url: str, copy_headers: tuple[str, ...] = IDENTITY_HEADERS, proxy_key: str = "") -> JSON:
    """The JSON that Caddy's ``forward_auth`` directive expands to (newer-Caddy shape; works on 2.6 too).

    The auth request is a GET to ``auth_url`` carrying the client's headers (cookies, Authorization) plus the
    original method and URI (Caddy itself sets ``X-Forwarded-Host``/``-Proto`` from what it saw, replacing
    client-sent values). On 2xx each copied header is set only if the auth response has a non-empty value (so a
    missing X-Ussy-Email does not arrive as an empty header); every client-sent copy was already dropped by
    :func:`~ussycode.proxy.hygiene.strip_client_identity`, the first handler of every chain.
    """
    dial, uri = auth_target(auth_url)
    copy_routes: list[JSON] = []
    for name in copy_headers:
        placeholder = "{http.reverse_proxy.header." + name + "}"
        copy_routes.append(
            {
                # An absent response header is a nil placeholder, which the vars matcher (Caddy 2.6 and later)
                # prints as "<nil>": both that and "" mean "do not set".
                "match": [{"not": [{"vars": {placeholder: ["", "<nil>"]}}]}],
                "handle": [{"handler": "headers", "request": {"set": {name: [placeholder]}}}],
            }
        )
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": dial}],
        "rewrite": {"method": "GET", "uri": uri},
        "headers": {
            "request": {
                "set": {
                    "X-Forwarded-Method": ["{http.request.method}"],
                    "X-Forwarded-Uri": ["{http.request.uri}"],
                    **client_address_headers(proxy_key),
                }
            }
        },
        "handle_response": [{"match": {"status_code": [2]}, "routes": copy_routes}],
    }


def proxy_handler(upstream: str) -> JSON:
    """Reverse-proxy to ``upstream``. Caddy (2.5 and later) itself sets ``X-Forwarded-For``/``-Proto``/``-Host``
    from what it saw, replacing client-sent values (our server trusts no proxy), so no header is set here.

    No ``flush_interval`` either: Caddy already writes a response through at once when it streams (Server-Sent
    Events, no Content-Length, HTTP/2 streams) and never buffers WebSockets; forcing a flush after every write,
    like setting headers through placeholders, costs a tenth to a fifth of the requests/s of small answers."""
    return {"handler": "reverse_proxy", "upstreams": [{"dial": upstream}]}


def vm_handlers(upstream: str, app: str, auth_url: str = "", proxy_key: str = "") -> list[JSON]:
    """The handler chain of every VM route (see the module docstring); ``auth_url`` empty = public."""
    handle: list[JSON] = [strip_client_identity(), ours_route(app, proxy_key)]
    if auth_url:
        handle.append(forward_auth_handler(auth_url, proxy_key=proxy_key))
    handle += [strip_platform_credentials(), proxy_handler(upstream)]
    return handle


def build_route(route: Route) -> JSON:
    """Route -> one Caddy route object (with ``@id``), to go before the catch-all."""
    if route.kind is RouteKind.APEX:
        app = app_proxy_handler(route.upstream, route.proxy_key)
        app["flush_interval"] = -1
        handle = [strip_client_identity(), app]
    else:
        handle = vm_handlers(route.upstream, route.app, route.auth_url if route.needs_auth else "", route.proxy_key)
    return {"@id": route.route_id, "match": [{"host": [route.host]}], "handle": handle, "terminal": True}


def build_catchall() -> JSON:
    """Unknown host -> 404 page. Always the last route of our server."""
    return {
        "@id": CATCHALL_ID,
        "handle": [
            {
                "handler": "static_response",
                "status_code": 404,
                "headers": {"Content-Type": ["text/html; charset=utf-8"]},
                "body": NOT_FOUND_HTML,
            }
        ],
        "terminal": True,
    }


@dataclass(frozen=True)
class ServerSettings:
    """What the Caddy config needs from ``ussycode serve`` settings.

    ``admin_listen`` is a Caddy network address (``unix//path/admin.sock`` or ``127.0.0.1:2019``);
    ``storage_dir`` holds Caddy's CA and certificates (under the data dir); ``ask_url`` is the on-demand TLS
    ``ask`` endpoint that says yes only for verified custom domains (and VM hosts in acme mode).
    """

    domain: str
    https_addr: str = ":8443"
    http_addr: str = "127.0.0.1:8080"
    tls: TlsMode = TlsMode.INTERNAL
    acme_email: str = ""
    ask_url: str = ""
    proxy_key: str = ""
    admin_listen: str = ""
    storage_dir: str = ""
    grace_period: str = "5s"

    def __post_init__(self) -> None:
        if not valid_host(self.domain):
            raise ValueError(f"not a valid domain: {self.domain!r}")
        if self.tls is TlsMode.ACME and not self.acme_email:
            raise ValueError("--tls acme needs --acme-email")


def listen_address(addr: str) -> str:
    """``:8443`` / ``127.0.0.1:8443`` / ``[::1]:8443`` as Caddy's listen syntax (the same form)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address needs a port: {addr!r}")
    return addr


def build_errors(domain: str) -> JSON:
    """Server error routes: a 502/503/504 on a VM host (bridge refused or closed) -> "not answering" page."""
    return {
        "routes": [
            {
                "match": [
                    {
                        "vars": {"{http.error.status_code}": ["502", "503", "504"]},
                        "not": [{"host": [domain]}],
                    }
                ],
                "handle": [
                    {
                        "handler": "static_response",
                        "status_code": 502,
                        "headers": {"Content-Type": ["text/html; charset=utf-8"]},
                        "body": VM_DOWN_HTML,
                    }
                ],
                "terminal": True,
            },
            {
                "handle": [
                    {
                        "handler": "static_response",
                        "status_code": "{http.error.status_code}",
                        "body": "{http.error.status_code} {http.error.status_text}\n",
                    }
                ],
                "terminal": True,
            },
        ]
    }


def build_server(settings: ServerSettings, routes: list[Route] | tuple[Route, ...] = ()) -> JSON:
    """Our HTTP server: listen address, routes (apex first, then ``routes``, catch-all last), TLS mode."""
    apex = Route(RouteKind.APEX, settings.domain, settings.http_addr, public=True, proxy_key=settings.proxy_key)
    all_routes = [build_route(apex)] + [build_route(r) for r in routes if r.route_id != apex.route_id]
    server: JSON = {
        "listen": [listen_address(settings.https_addr)],
        "routes": [*all_routes, build_catchall()],
        "errors": build_errors(settings.domain),
    }
    if settings.tls is TlsMode.OFF:
        server["automatic_https"] = {"disable": True}
    else:
        # TLS on our listener whatever its port; never start an :80 redirect server.
        server["tls_connection_policies"] = [{}]
        server["automatic_https"] = {"disable_redirects": True}
    return server


def wildcard_ok(domain: str) -> bool:
    """Whether clients accept a ``*.<domain>`` certificate: TLS libraries refuse a wildcard over a single label
    (``*.localhost``, like ``*.com``), so such a domain gets a certificate per name instead."""
    return domain.count(".") >= 1


def build_tls_app(settings: ServerSettings) -> JSON | None:
    """The ``tls`` app for internal/acme modes (None for off).

    internal: Caddy keeps a wildcard certificate ``*.<domain>`` and one for the apex (``certificates.automate``:
    no route names a host), so VM URLs, port URLs and unknown hosts all complete a handshake. Where a wildcard
    cannot work (a single-label domain such as ``localhost``) and for custom domains, names get on-demand
    certificates that the permission endpoint (``ask_url``) approves. acme: the apex is managed; every other
    name is on demand, approved the same way.
    """
    if settings.tls is TlsMode.OFF:
        return None
    names = [settings.domain]
    if settings.tls is TlsMode.INTERNAL:
        issuer: JSON = {"module": "internal"}
        if wildcard_ok(settings.domain):
            names.insert(0, f"*.{settings.domain}")
    else:
        # No wildcard with ACME (it needs a DNS challenge): each VM host gets its own certificate on demand.
        issuer = {"module": "acme", "email": settings.acme_email}
    policies: list[JSON] = [{"subjects": list(names), "issuers": [issuer]}]
    automation: JSON = {"policies": policies}
    if settings.ask_url:
        policies.append({"issuers": [issuer], "on_demand": True})
        automation["on_demand"] = {"permission": {"module": "http", "endpoint": settings.ask_url}}
    return {"automation": automation, "certificates": {"automate": names}}


def build_config(settings: ServerSettings, routes: list[Route] | tuple[Route, ...] = ()) -> JSON:
    """A complete Caddy config for a managed Caddy (``caddy run --config``, or ``POST /load``)."""
    config: JSON = {
        "admin": {"config": {"persist": False}},
        "apps": {
            "http": {
                "grace_period": settings.grace_period,
                "servers": {SERVER_NAME: build_server(settings, routes)},
            },
        },
    }
    if settings.admin_listen:
        config["admin"]["listen"] = settings.admin_listen
    if settings.storage_dir:
        config["storage"] = {"module": "file_system", "root": settings.storage_dir}
    tls_app = build_tls_app(settings)
    if tls_app is not None:
        config["apps"]["tls"] = tls_app
        # Never try to install our local CA into the host's trust stores.
        config["apps"]["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
        _, _, port = settings.https_addr.rpartition(":")
        config["apps"]["http"]["https_port"] = int(port)
    return config


PORT_CAPTURE = "ussyport"


def build_any_port_route(vm_host: str, socket_prefix: str, auth_url: str, app: str,
                         exclude_hosts: tuple[str, ...] = (), proxy_key: str = "") -> JSON:
    """``<port>-<vm_host>`` for every port 3000-9999 that has no route of its own: always private.

    Caddy's host matcher has no ``<n>-name`` wildcard, so the Host header is matched with a regexp (case-insensitive,
    optional trailing dot and port). The upstream is ``unix/<socket_prefix><port>.sock`` (the port comes from the
    regexp capture); forward-auth starts that bridge when it allows a request. ``exclude_hosts`` are the port hosts
    that have their own (public) route, so the order of routes never matters.
    """
    if not valid_host(vm_host):
        raise ValueError(f"not a valid route host: {vm_host!r}")
    pattern = "(?i)^([3-9][0-9]{3})-" + vm_host.replace(".", r"\.") + r"\.?(:[0-9]+)?$"
    matcher: JSON = {"header_regexp": {"Host": {"name": PORT_CAPTURE, "pattern": pattern}}}
    if exclude_hosts:
        matcher["not"] = [{"host": sorted(exclude_hosts)}]
    upstream = socket_prefix + "{http.regexp." + PORT_CAPTURE + ".1}.sock"
    return {
        "@id": f"{ROUTE_ID_PREFIX}ports-{vm_host}",
        "match": [matcher],
        "handle": vm_handlers(upstream, app, auth_url, proxy_key),
        "terminal": True,
    }

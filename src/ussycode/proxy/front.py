"""The front door's Caddy config: static, the same for every VM (pure builders, no I/O).

No VM change (create, start, stop, rename, rm, share) ever changes Caddy's config, so Caddy never reloads
because of one and no in-flight request, stream or WebSocket is cut. The routing table lives in the app
server (forward-auth names the upstream) and, for public hosts, in the file system (:mod:`ussycode.proxy.hosts`:
``<hosts>/sockets/<host>`` exists only for a public URL of a running VM).

Routes of our server, in order:

1. ``ussycode-apex`` — the domain itself -> the app server (API, ``/exec``, sign-in).
2. ``ussycode-grants`` — a request with a well-formed grant cookie (:mod:`ussycode.proxy.grants`): if its file
   ``<grants>/<host>/<value>`` exists, straight to the VM port's bridge the cookie names, with the identity
   headers it spells (forward-auth let this signed-in browser in moments ago and nothing changed since);
   otherwise the forward-auth chain. A bridge that is gone (the dial sent nothing) falls back the same way.
3. ``ussycode-public-anonymous`` — a request to a plain host name with no Cookie, no Authorization, no share
   parameter and a path outside ``/__ussycode``: what the public route (5.) does for it, without the steps that
   have nothing to act on (the chain only strips client identity headers); ahead of the credentials route (which
   needs one of those) and after the grants route (so a signed-in browser's requests never test this one).
4. ``ussycode-credentials`` — a request carrying one of our credentials (session or share-link cookie, share-link
   parameter, platform token) -> forward-auth, which decides access (private URLs) or names the signed-in visitor
   (public URLs) and names the upstream in ``X-Ussy-Upstream``; Caddy keeps it in a variable and dials it.
5. ``ussycode-public`` — every other request to a plain host name -> dials ``<hosts>/sockets/<host>``, with no
   Python and no extra check on the path: only a public host has that socket. For any other host the dial fails
   with "no such file" before a byte is sent, and the server's error routes hand the untouched request (body
   included: Caddy 2.11.2 and later keep it on dial errors) to the forward-auth chain, which answers private URLs
   (sign-in), unknown hosts (404) and stopped VMs (a page) itself.
6. ``ussycode-vms`` — any other host (upper case, odd characters) -> the forward-auth chain.

Every VM route but 3. (whose requests carry nothing else to act on) runs the trust boundary's handler chain
(:mod:`ussycode.proxy.hygiene`, in its order): strip client identity headers in every spelling,
``/__ussycode/*`` to the app server, the access decision, strip our credentials, proxy. A 502/504 from a VM
(nothing listens on the port) becomes a page (HTML for browsers, JSON otherwise) in the server's error routes.

TLS: ``--tls internal`` keeps a wildcard certificate ``*.<domain>`` (and the apex) from Caddy's local CA, so
every VM URL, every port URL and unknown hosts complete a handshake; custom domains get on-demand
certificates. ``--tls acme``: the apex is managed, every other name gets an on-demand certificate only if the
permission endpoint (``tls-ask``) approves it (existing VM hosts, their port hosts, verified custom domains).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ussycode.proxy import links
from ussycode.proxy.bridge import MAX_UNIX_PATH, socket_name
from ussycode.proxy.grants import GRANT_HEADER, REGEXP_NAME
from ussycode.proxy.grants import cookie_re as grant_cookie_re
from ussycode.proxy.hygiene import (
    OURS_PREFIX,
    PLATFORM_TOKEN_RE,
    SHARE_PARAM,
    ours_route,
    strip_client_identity,
    strip_platform_credentials,
)
from ussycode.proxy.matchers import HOST_MAX, host_match
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
ANONYMOUS_ROUTE_ID = "ussycode-public-anonymous"
CREDENTIALS_ROUTE_ID = "ussycode-credentials"
VMS_ROUTE_ID = "ussycode-vms"
GRANTS_ROUTE_ID = "ussycode-grants"
_GRANT = "{http.regexp." + REGEXP_NAME + ".%s}"
_GRANT_PART = re.escape(_GRANT).replace("%s", "([a-z]+)")  # the part a placeholder of _GRANT names
# Host names the grants route looks up as a directory name (no slash; a leading dot-dot is impossible).
GRANT_HOST_RE = r"^[a-z0-9][a-z0-9.-]*$"
# Streams (WebSockets) stay open this long after a config unload (only an attached Caddy's own reloads).
STREAM_CLOSE_DELAY = "24h"
# Our session and share-link cookies (``__Host-`` prefixed unless --tls off): credentials forward-auth reads.
CREDENTIAL_COOKIE_RE = r"(^|;)[ \t]*(__Host-)?ussy_(session|share_[A-Za-z0-9_-]*)="
# Host names the fast path may turn into a file name (anything else goes through forward-auth); the length is
# bounded (FrontSettings.fast_host) so that the socket path fits in a unix socket address (a longer one would
# fail otherwise than "no such file").
FAST_HOST_RE = r"^[a-z0-9][a-z0-9.-]*$"
# Host names the routed fast path looks up (proxy.links): a name, never an address (an IPv4 literal ends with a
# digit, so Caddy would dial it as it is) and no trailing dot.
ROUTED_HOST_RE = r"^[a-z0-9][a-z0-9.-]*[a-z]$"

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

    ``auth_url``: the forward-auth endpoint (with its key); ``public_dial``: the dial template of public hosts'
    sockets (``unix/<dir>/{http.request.host}``, :meth:`~ussycode.proxy.hosts.PublicHosts.dial_template`);
    ``grants``: the grants' directory (:mod:`ussycode.proxy.grants`) and ``bridges``: the port bridges'
    directory as Caddy dials it (both empty: no grants route). ``routed``: public hosts are routed addresses
    Caddy looks up by name (:mod:`ussycode.proxy.links`) instead of sockets.
    """

    auth_url: str
    public_dial: str
    grants: str = ""
    bridges: str = ""
    routed: bool = False

    def __post_init__(self) -> None:
        if not self.public_dial.startswith("unix/") or not self.public_dial.endswith("/{http.request.host}"):
            raise ValueError(f"public hosts are dialed as unix/<dir>/{{http.request.host}}, got {self.public_dial!r}")
        if bool(self.grants) != bool(self.bridges) or (self.grants and not self.grants.startswith("/")):
            raise ValueError("grants need an absolute directory and the bridges' directory")

    @property
    def _sockets(self) -> str:
        return self.public_dial.removeprefix("unix/").removesuffix("{http.request.host}")

    @property
    def fast_host(self) -> JSON | None:
        """A matcher set for the host names the public route dials (None: the directory's path leaves no room
        for one)."""
        if self.routed:
            return host_match(ROUTED_HOST_RE, HOST_MAX)
        room = min(MAX_UNIX_PATH - len(self._sockets.encode()), HOST_MAX)
        return host_match(FAST_HOST_RE, room) if room >= 1 else None

    @property
    def not_public_error(self) -> str:
        """A regexp for the error of dialing a host that has no public socket or route (the dial sent nothing)."""
        if self.routed:
            # Go names the bound source first: "dial tcp 169.254.77.1:0->240.0.0.0:8080: connect: ..."
            return ("^dial tcp (" + re.escape(links.HOST_ADDR) + r":[0-9]{1,5}->)?"
                    r"240\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}:" + str(links.DIAL_PORT) + ": connect: no route to host$")
        return "^dial unix " + re.escape(self._sockets) + "[^/]*: connect: no such file or directory$"

    @property
    def grant_dial(self) -> str | None:
        """The grants route's dial: the bridge of the VM and port the cookie names (None: no grants route, or
        a bridge's path would not fit in a unix socket address)."""
        if not self.grants:
            return None
        if self.routed:
            return _GRANT % "addr" + f":{links.DIAL_PORT}"
        dial = f"{self.bridges}/{socket_name(_GRANT % 'vm', _GRANT % 'port')}"
        longest = len(f"{self.bridges}/{socket_name('f' * 16, 65535)}".encode())
        return "unix/" + dial if longest <= MAX_UNIX_PATH else None

    @property
    def no_bridge_error(self) -> str:
        """A regexp for the error of dialing a bridge the grants route named that is not there (the dial sent
        nothing): the grant outlived the bridge, and forward-auth starts it again."""
        if self.routed:
            return self.not_public_error  # a routed VM port whose route is gone
        return ("^dial unix " + re.escape(self.bridges + "/") + r"[0-9a-f]{16}-[0-9]{1,5}\.sock: connect: "
                "(no such file or directory|connection refused)$")


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
    # A grant cookie the browser lacks (proxy.grants), added to the client's response now (not deferred: by
    # the time the VM answers, these placeholders name the VM's headers).
    grant = "{http.reverse_proxy.header." + GRANT_HEADER + "}"
    routes.insert(1, {"match": [{"not": [{"vars": {grant: ["", "<nil>"]}}]}],
                      "handle": [{"handler": "headers", "response": {"add": {"Set-Cookie": [grant]}}}]})
    return handler


def credential_matchers() -> list[JSON]:
    """Any of our credentials in a request (matcher sets are alternatives)."""
    return [
        {"header_regexp": {"Cookie": {"pattern": CREDENTIAL_COOKIE_RE}}},
        {"header_regexp": {"Authorization": {"pattern": PLATFORM_TOKEN_RE}}},
        {"query": {SHARE_PARAM: ["*"]}},
    ]


def build_credentials_route(settings: ServerSettings, front: FrontSettings) -> JSON:
    return {**build_vms_route(settings, front), "@id": CREDENTIALS_ROUTE_ID, "match": credential_matchers()}


def routed_transport() -> JSON:
    """Dials of routed addresses come from the one source address a VM's DNAT takes (proxy.links)."""
    return {"protocol": "http", "local_address": links.HOST_ADDR}


def routed_upstreams() -> JSON:
    """The routed fast path's upstreams: the host name's address from Caddy's hosts file (cached a second;
    nothing is asked of any DNS server), else the unreachable sink, so the dial fails before sending a byte."""
    return {"upstreams": [{"dial": f"{links.SINK}:{links.DIAL_PORT}"}], "transport": routed_transport(),
            "dynamic_upstreams": {"source": "a", "name": "{http.request.host}", "port": str(links.DIAL_PORT),
                                  "refresh": "1s", "versions": {"ipv4": True},
                                  "resolver": {"addresses": [links.NO_RESOLVER]}}}


def build_public_route(settings: ServerSettings, front: FrontSettings) -> JSON | None:
    fast_host = front.fast_host
    if fast_host is None:
        return None
    handle = vm_chain(front.public_dial, settings.http_addr, None, settings.proxy_key)
    if front.routed:
        handle[-1].update(routed_upstreams())
    return {
        "@id": PUBLIC_ROUTE_ID,
        "match": [fast_host],
        "handle": handle,
        "terminal": True,
    }


def build_anonymous_route(settings: ServerSettings, front: FrontSettings) -> JSON | None:
    """The public route for a request that carries nothing the trust chain would act on: no Cookie header, no
    Authorization header, no share parameter, not under ``/__ussycode``. For such a request the chain only deletes
    client identity headers, so this route does that and dials as the public route does, skipping the credentials
    route (which needs one of those to match) and the chain's subroutes: 5 µs less of Caddy's CPU per anonymous
    request, measured against the whole route list (35 µs) with a static answer."""
    public = build_public_route(settings, front)
    if public is None:
        return None
    (fast,) = public["match"]
    carries_nothing = {**fast, "header": {"Cookie": None, "Authorization": None},  # null: the field is absent
                       "not": [*fast["not"], {"path": [OURS_PREFIX, OURS_PREFIX + "/*"]},
                               {"query": {SHARE_PARAM: ["*"]}}]}
    return {"@id": ANONYMOUS_ROUTE_ID, "match": [carries_nothing],
            "handle": [strip_client_identity(), public["handle"][-1]], "terminal": True}


def grant_identity() -> JSON:
    """The identity headers a grant cookie spells (its file exists, so forward-auth wrote exactly these)."""
    identity = {"X-Ussy-Access": [_GRANT % "access"], "X-Ussy-User-Id": [_GRANT % "user"],
                "X-Ussy-Handle": [_GRANT % "handle"]}
    return {"handler": "subroute", "routes": [
        {"handle": [{"handler": "headers", "request": {"set": identity}}]},
        {"match": [{"vars_regexp": {_GRANT % "email": {"pattern": "."}}}],
         "handle": [{"handler": "headers", "request": {"set": {"X-Ussy-Email": [_GRANT % "email"]}}}]},
    ]}


def build_grants_route(settings: ServerSettings, front: FrontSettings) -> JSON | None:
    """A request with a well-formed grant cookie: if its file exists, straight to the bridge it names with the
    identity it spells; otherwise forward-auth, as for any request with our credentials."""
    dial = front.grant_dial
    if dial is None:
        return None
    handle = vm_chain(dial, settings.http_addr, grant_identity(), settings.proxy_key)
    if front.routed:
        handle[-1]["transport"] = routed_transport()
    # first_exist_fallback: the one entry is tried by globbing it, which opens it once and yields it only if it
    # exists; the default policy would open it a second time (stock Caddy stats a file by opening it).
    grant_file = {"root": front.grants, "try_files": ["/{http.request.host}/" + _GRANT % "value"],
                  "try_policy": "first_exist_fallback"}
    fast: JSON = {
        "match": [{"file": grant_file}],
        "handle": handle,
        "terminal": True,
    }
    # The cookie's pattern captures exactly the parts the fast route reads (its placeholders): no more, as each
    # capture costs Caddy placeholders per request; no fewer, or a header or the dial would keep a placeholder.
    parts = set(re.findall(_GRANT_PART, json.dumps(fast))) - {"value"}
    grant = {"name": REGEXP_NAME, "pattern": grant_cookie_re(settings.tls is not TlsMode.OFF, parts)}
    return {
        "@id": GRANTS_ROUTE_ID,
        # One matcher set: both run before the subroute, whose file matcher reads what the cookie's captured.
        "match": [{**host_match(GRANT_HOST_RE, HOST_MAX), "header_regexp": {"Cookie": grant}}],
        "handle": [{"handler": "subroute",
                    "routes": [fast, {"handle": build_vms_route(settings, front)["handle"]}]}],
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


def vm_down_routes(domain: str) -> list[JSON]:
    """A 502/503/504 from a VM (its forwarder connected, nothing listens, or it timed out) -> a clear page."""
    vm_down: JSON = {"vars": {"{http.error.status_code}": ["502", "503", "504"]}, "not": [{"host": [domain]}]}
    return [
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


def build_front_errors(settings: ServerSettings, front: FrontSettings) -> JSON:
    """The server's error routes: a host the public route could not dial (it has no public socket, so nothing
    was sent) goes through the forward-auth chain, in a subroute with its own pages; everything else -> a page."""
    not_apex: JSON = {"not": [{"host": [settings.domain]}]}
    # (one pattern when both dials are routed addresses)
    fell_back = list(dict.fromkeys([front.not_public_error] + ([front.no_bridge_error] if front.grant_dial else [])))
    nothing_sent = [{"vars_regexp": {"{http.error.message}": {"pattern": p}}, **not_apex} for p in fell_back]
    fallback = {
        "handler": "subroute",
        "routes": [{"handle": build_vms_route(settings, front)["handle"]}],
        "errors": {"routes": vm_down_routes(settings.domain)},
    }
    return {"routes": [{"match": nothing_sent, "handle": [fallback], "terminal": True},
                       *vm_down_routes(settings.domain)]}


def build_front_server(settings: ServerSettings, front: FrontSettings) -> JSON:
    """Our HTTP server: apex, credentials through forward-auth, the public fast path, every other host through
    forward-auth."""
    apex = build_route(Route(RouteKind.APEX, settings.domain, settings.http_addr, public=True,
                             proxy_key=settings.proxy_key))
    server: JSON = {
        "listen": [listen_address(settings.https_addr)],
        "routes": [route for route in (apex, build_grants_route(settings, front),
                                       build_anonymous_route(settings, front), build_credentials_route(settings, front),
                                       build_public_route(settings, front), build_vms_route(settings, front))
                   if route],
        "errors": build_front_errors(settings, front),
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

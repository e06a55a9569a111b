"""What a request may carry into a VM: pure builders of the Caddy handlers that enforce the trust boundary.

A VM's app and its visitors are hostile to each other. Every VM route (private, public, port URL, custom domain)
runs, in this order:

1. :func:`strip_client_identity` — before anything else: every client-sent ``X-Ussy-*`` header and every request
   header whose name contains an underscore is dropped (as nginx does by default), so no spelling of an identity
   header (``X-Ussy_Handle``, ``x_ussy_access``; CGI/WSGI fold ``-`` and ``_`` into one ``HTTP_X_USSY_*`` name)
   reaches an app. Identity headers come only from forward-auth, after this step.
2. :func:`ours_route` — ``/__ussycode`` and ``/__ussycode/*`` on any VM host go to the app server (sign-in
   hand-off, logout), never to the VM, public VMs included.
3. forward-auth (private routes only; see ``proxy.routes``) — needs the client's cookies and Authorization.
4. :func:`strip_platform_credentials` — after the access decision: ``Authorization`` values carrying a platform
   token (``usy0.``/``usy1.``), our session, sign-in, grant and share-link cookies (other cookies stay), and the
   ``ussy_share`` query parameter are removed. An ``Authorization`` that is not ours (the app's own Basic or
   Bearer auth) reaches the app unchanged.
5. the reverse proxy to the VM.

The app server learns the browser's address only from Caddy: :func:`client_address_headers` sets
``X-Ussy-Client-Addr`` (Caddy's view of the peer) and ``X-Ussy-Proxy-Key`` (a secret made at each start) on
requests to the app server; client-sent copies were dropped in step 1. A request to the app port without the
key is limited by its own peer address.
"""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]

OURS_PREFIX = "/__ussycode"
SHARE_PARAM = "ussy_share"
CLIENT_ADDR_HEADER = "X-Ussy-Client-Addr"
PROXY_KEY_HEADER = "X-Ussy-Proxy-Key"

# Our cookies: the session (``__Host-`` prefixed unless --tls off), the sign-in "next" cookie, share-link cookies,
# the grant (proxy.grants).
OUR_COOKIE_RE = r"(?:__Host-)?ussy_(?:session|next|grant|share_[A-Za-z0-9_-]*)"
# One cookie pair of ours, with the separator before it (or the start of the header).
_OUR_COOKIE_PAIR = r"(?:^|;)[ \t]*" + OUR_COOKIE_RE + r"=[^;]*"
# A platform token anywhere in an Authorization value (Bearer usy1.…, usy0.…, any scheme or spacing).
PLATFORM_TOKEN_RE = r"(?i)usy[01]\."  # noqa: S105 - a pattern, not a secret


def strip_client_identity() -> JSON:
    """Delete client-sent identity headers in every spelling, and every header with an underscore in its name.

    Caddy deletes by canonical name with ``*`` wildcards at either end: ``X-Ussy-*`` covers any case of the
    dashed form (names are canonicalised), ``*_*`` every name containing ``_``.
    """
    return {"handler": "headers", "request": {"delete": ["X-Ussy-*", "*_*"]}}


def strip_platform_credentials() -> JSON:
    """After the access decision: remove our tokens, cookies and share parameter; leave everything else."""
    replace = {
        "Cookie": [
            {"search_regexp": _OUR_COOKIE_PAIR, "replace": ""},
            {"search_regexp": r"^[ \t;]+", "replace": ""},
        ],
    }
    return {
        "handler": "subroute",
        "routes": [
            # Any Authorization value naming a platform token goes, all values with it.
            {
                "match": [{"header_regexp": {"Authorization": {"pattern": PLATFORM_TOKEN_RE}}}],
                "handle": [{"handler": "headers", "request": {"delete": ["Authorization"]}}],
            },
            # Each Cookie value loses our pairs (a value that held only ours is left empty: a matcher sees only
            # the first of several Cookie headers, so deleting "empty" ones could drop the app's cookies).
            {"handle": [{"handler": "headers", "request": {"replace": replace}}]},
            {
                "match": [{"query": {SHARE_PARAM: ["*"]}}],
                "handle": [{"handler": "rewrite", "query": {"delete": [SHARE_PARAM]}}],
            },
        ],
    }


def client_address_headers(proxy_key: str) -> dict[str, list[str]]:
    """Headers Caddy sets on requests to the app server: the peer address it saw, and the per-start key that
    says the header came from Caddy. Empty without a key (the app then uses peer addresses only)."""
    if not proxy_key:
        return {}
    return {CLIENT_ADDR_HEADER: ["{http.request.remote.host}"], PROXY_KEY_HEADER: [proxy_key]}


def app_proxy_handler(app_upstream: str, proxy_key: str = "") -> JSON:
    """Reverse-proxy to the app server, keeping the Host (the app serves ``/__ussycode/*`` per host)."""
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": app_upstream}],
        "headers": {
            "request": {
                "set": {
                    "X-Forwarded-Proto": ["{http.request.scheme}"],
                    "X-Forwarded-Host": ["{http.request.hostport}"],
                    **client_address_headers(proxy_key),
                }
            }
        },
    }


def ours_route(app_upstream: str, proxy_key: str = "") -> JSON:
    """A subroute that answers ``/__ussycode`` and ``/__ussycode/*`` from the app server (terminal), so a VM
    app never sees a hand-off code or our logout on its host."""
    return {
        "handler": "subroute",
        "routes": [
            {
                "match": [{"path": [OURS_PREFIX, OURS_PREFIX + "/*"]}],
                "handle": [app_proxy_handler(app_upstream, proxy_key)],
                "terminal": True,
            }
        ],
    }

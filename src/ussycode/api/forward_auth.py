"""Who may open a VM URL: one pure :func:`decide`, no I/O.

Caddy asks the app server (a GET to the forward-auth endpoint carrying the client's cookies and Authorization
plus ``X-Forwarded-{Host,Uri,Method,Proto}``) before proxying a private VM URL. The endpoint builds an
:class:`AuthRequest` (:meth:`AuthRequest.from_headers`), looks up what
:func:`~ussycode.api.hostnames.parse_target` names (a VM by name, or by verified custom domain), the VM's
shares, the browser session and the Bearer token, and renders the :class:`Decision` as is: 2xx lets Caddy
continue (copying the ``X-Ussy-*`` identity headers onto the request); any other status goes back to the client
verbatim (login redirect, 401 JSON, 403, 404, share-link redirect).

A share link opens the one URL (VM and port) it was made for; links are compared by the hash of their token.

Order: bad host -> 400; unknown VM/port -> 404; public port -> allow (naming a signed-in visitor); a
``ussy_share`` link in the URL (valid: set a cookie, redirect to the URL without it; invalid: 403 unless the
request is allowed anyway, then just strip it); ``Authorization: Bearer usy0.…/usy1.…`` (a platform token; any
other Authorization is the app's and is ignored here) -> allow (owner/shared, right VM scope) / 401 / 403, never
falling back to cookies; session owner/shared -> allow; valid share-link cookie -> allow; session without
access -> 403; nobody -> login redirect for a browser page, 401 JSON otherwise.
"""

from __future__ import annotations

import enum
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from urllib.parse import parse_qsl, quote, urlencode

from ussycode.api.hostnames import DEFAULT_PORT, HostError, parse_target, split_host_port
from ussycode.api.pages import error_json
from ussycode.auth.links import link_token_hash

SHARE_PARAM = "ussy_share"
SHARE_COOKIE_PREFIX = "ussy_share_"
SHARE_COOKIE_MAX_AGE = 24 * 3600

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_SAFE_VALUE_RE = re.compile(r"^[\x20-\x7e]*$")
_PLATFORM_TOKEN_RE = re.compile(r"(?i)^usy[01]\.")


class Outcome(enum.StrEnum):
    ALLOW = "allow"
    REDIRECT = "redirect"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"


class Access(enum.StrEnum):
    """How an allowed request got in (sent to the VM as ``X-Ussy-Access``; also a telemetry label)."""

    PUBLIC = "public"
    OWNER = "owner"
    SHARED = "shared"
    SHARE_LINK = "share-link"
    BEARER = "bearer"


@dataclass(frozen=True)
class Identity:
    """A signed-in user (from the browser session or a verified token)."""

    user_id: str
    handle: str
    email: str | None = None


SessionView = Identity


@dataclass(frozen=True)
class BearerView:
    """The caller's verification of ``Authorization: Bearer``: ``valid`` False for unknown, expired, revoked or
    malformed tokens; ``vm_id`` is the token's VM scope (``token create --vm``), None for any VM."""

    valid: bool
    user: Identity | None = None
    vm_id: str | None = None


@dataclass(frozen=True)
class ShareLink:
    """A live share link as stored: the hash of its token, and the one URL (VM, port) it opens."""

    token_hash: str
    vm_id: str
    port: int = DEFAULT_PORT
    expires_at: datetime | None = None  # timezone-aware; None never expires

    def valid_for(self, vm_id: str, port: int, token: str, now: datetime) -> bool:
        if self.vm_id != vm_id or self.port != port or (self.expires_at is not None and self.expires_at <= now):
            return False
        return hmac.compare_digest(self.token_hash.encode(), link_token_hash(token).encode())


@dataclass(frozen=True)
class ShareView:
    """Who the VM is shared with: user ids, e-mail addresses (lower-case), and its live share links."""

    user_ids: frozenset[str] = frozenset()
    emails: frozenset[str] = frozenset()
    links: tuple[ShareLink, ...] = ()


@dataclass(frozen=True)
class VmView:
    """The VM behind a host. ``public`` makes the main URL (port 8080) public; ``public_ports`` lists other
    ports made public with ``share set-public --port``; ``cnames`` are its verified custom domains."""

    id: str
    name: str
    owner_id: str
    public: bool = False
    public_ports: frozenset[int] = frozenset()
    cnames: frozenset[str] = frozenset()

    def is_public(self, port: int) -> bool:
        return (port == DEFAULT_PORT and self.public) or port in self.public_ports


@dataclass(frozen=True)
class AuthRequest:
    """The original request as Caddy forwarded it. ``host`` is raw (may carry a port); ``uri`` is path+query."""

    host: str
    uri: str = "/"
    method: str = "GET"
    scheme: str = "https"
    cookies: Mapping[str, str] = field(default_factory=dict)
    authorization: str = ""
    accept: str = ""

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0] or "/"

    @property
    def query(self) -> str:
        return self.uri.split("?", 1)[1] if "?" in self.uri else ""

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> AuthRequest:
        """From the forward-auth request's headers (Caddy sets X-Forwarded-*; it overwrites client copies)."""
        h = {k.lower(): v for k, v in headers.items()}
        scheme = h.get("x-forwarded-proto", "https").lower()
        return cls(
            host=h.get("x-forwarded-host") or h.get("host", ""),
            uri=h.get("x-forwarded-uri", "/") or "/",
            method=(h.get("x-forwarded-method") or "GET").upper(),
            scheme=scheme if scheme in ("http", "https") else "https",
            cookies=parse_cookies(h.get("cookie", "")),
            authorization=h.get("authorization", ""),
            accept=h.get("accept", ""),
        )

    @property
    def bearer_token(self) -> str | None:
        """The platform token (``usy0.``/``usy1.``) in ``Authorization: Bearer``, if there is one. Any other
        Authorization (the app's own Basic or Bearer auth) is not ours: it is ignored here and reaches the app."""
        scheme, _, value = self.authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not _PLATFORM_TOKEN_RE.match(value):
            return None
        return value


@dataclass(frozen=True)
class Decision:
    """What the forward-auth endpoint answers: ``status`` 200 = allow, with ``headers`` (identity headers for
    the VM, or Location/Set-Cookie for the browser) and a body for denials."""

    outcome: Outcome
    status: int
    reason: str
    access: Access | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


def parse_cookies(header: str) -> dict[str, str]:
    """A forgiving Cookie header parser (one bad pair never drops the others); the first of duplicates wins."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


# --- rendering helpers (pure) -------------------------------------------------------------------------------


def _wants_html(request: AuthRequest) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.accept.lower()


def _json_error(status: int, outcome: Outcome, reason: str, message: str, **extra: str) -> Decision:
    return Decision(outcome, status, reason, body=error_json(status, reason, message, **extra),
                    content_type="application/json")


def _page(status: int, outcome: Outcome, reason: str, title: str, message: str) -> Decision:
    body = (
        f"<!doctype html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>{message}</p></body></html>\n"
    )
    return Decision(outcome, status, reason, body=body, content_type="text/html; charset=utf-8")


def _deny(request: AuthRequest, status: int, outcome: Outcome, reason: str, title: str, message: str) -> Decision:
    if _wants_html(request):
        return _page(status, outcome, reason, title, message)
    return _json_error(status, outcome, reason, message)


def _identity_headers(identity: Identity | None, access: Access) -> tuple[tuple[str, str], ...]:
    if identity is None and access is Access.PUBLIC:
        return ()  # an anonymous visitor of a public URL is not described to the app (as on the file fast path)
    headers = [("X-Ussy-Access", access.value)]
    if identity is not None:
        for name, value in (
            ("X-Ussy-User-Id", identity.user_id),
            ("X-Ussy-Handle", identity.handle),
            ("X-Ussy-Email", identity.email or ""),
        ):
            if value and _SAFE_VALUE_RE.match(value):  # never emit a header value with control characters
                headers.append((name, value))
    return tuple(headers)


def _allow(access: Access, identity: Identity | None, reason: str) -> Decision:
    return Decision(Outcome.ALLOW, 200, reason, access=access, headers=_identity_headers(identity, access))


def _public_url(request: AuthRequest, host: str, path: str, query: str) -> str:
    _, port = split_host_port(request.host)
    authority = host if port is None else f"{host}:{port}"
    return f"{request.scheme}://{authority}{path}" + (f"?{query}" if query else "")


def _strip_share_param(query: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != SHARE_PARAM]
    return urlencode(pairs)


def _share_params(query: str) -> list[str]:
    return [v for k, v in parse_qsl(query, keep_blank_values=True) if k == SHARE_PARAM]


def _link_ok(shares: ShareView, vm_id: str, port: int, token: str | None, now: datetime) -> bool:
    if not token or not _TOKEN_RE.fullmatch(token):
        return False
    return any(link.valid_for(vm_id, port, token, now) for link in shares.links)


def user_access(vm: VmView, shares: ShareView, user: Identity) -> Access | None:
    """How ``user`` may open the VM on their own account (owner or shared), None if they may not."""
    if user.user_id == vm.owner_id:
        return Access.OWNER
    if user.user_id in shares.user_ids or (user.email and user.email.lower() in shares.emails):
        return Access.SHARED
    return None


def may_open(vm: VmView, port: int, shares: ShareView, user: Identity) -> bool:
    """Whether a signed-in user may open ``port`` of the VM without a share link (public, owner, shared):
    the hosts the apex hands a session to."""
    return vm.is_public(port) or user_access(vm, shares, user) is not None


def share_cookie_name(vm_id: str) -> str:
    return SHARE_COOKIE_PREFIX + vm_id


# --- the decision ---------------------------------------------------------------------------------------------


def _access(
    request: AuthRequest,
    vm: VmView,
    port: int,
    shares: ShareView,
    session: SessionView | None,
    bearer: BearerView | None,
    link_credential: bool,
    now: datetime,
    login_url: str,
    original_url: str,
) -> Decision:
    """The decision ignoring any ``ussy_share`` param (except as a credential for non-GET requests)."""
    if vm.is_public(port):
        # A signed-in visitor is named to the app on public VMs too.
        return _allow(Access.PUBLIC, session, "public")

    if request.bearer_token is not None:
        if bearer is None or not bearer.valid or bearer.user is None:
            return _json_error(401, Outcome.UNAUTHORIZED, "bearer_invalid", "invalid or expired token")
        if bearer.vm_id is not None and bearer.vm_id != vm.id:
            return _json_error(403, Outcome.FORBIDDEN, "bearer_wrong_vm", "this token is not valid for this VM")
        if user_access(vm, shares, bearer.user) is None:
            return _json_error(403, Outcome.FORBIDDEN, "bearer_no_access", "no access to this VM")
        return _allow(Access.BEARER, bearer.user, "bearer")

    cookie_link = _link_ok(shares, vm.id, port, request.cookies.get(share_cookie_name(vm.id)), now)
    if session is not None:
        access = user_access(vm, shares, session)
        if access is not None:
            return _allow(access, session, access.value)
        if cookie_link or link_credential:
            return _allow(Access.SHARE_LINK, session, "share_link")
        return _deny(
            request,
            403,
            Outcome.FORBIDDEN,
            "no_access",
            "No access",
            f"You are signed in as {escape(session.handle)}, but this VM is not shared with you. Ask its owner to "
            f"run <code>share add {escape(vm.name)} {escape(session.handle)}</code>.",
        )
    if cookie_link or link_credential:
        return _allow(Access.SHARE_LINK, None, "share_link")
    location = f"{login_url}?{urlencode({'next': original_url}, quote_via=quote)}"
    if _wants_html(request):
        return Decision(Outcome.REDIRECT, 302, "login", headers=(("Location", location),))
    return _json_error(401, Outcome.UNAUTHORIZED, "unauthenticated", "authentication required", login=location)


def decide(
    request: AuthRequest,
    *,
    domain: str,
    vm: VmView | None,
    shares: ShareView,
    session: SessionView | None,
    bearer: BearerView | None,
    now: datetime,
    login_url: str,
) -> Decision:
    """Decide one forward-auth request. ``vm`` is what the caller found for :func:`parse_target` of the host
    (by name, or by verified custom domain); it is checked against the host again here. ``bearer`` is the
    caller's verification of the request's Bearer token (None when there is none). ``now`` is timezone-aware.
    ``login_url`` is the absolute login page URL (``https://<domain>/__ussy/login``); ``next`` is appended."""
    try:
        target = parse_target(request.host, domain)
    except HostError as exc:
        return _json_error(400, Outcome.BAD_REQUEST, "bad_host", f"bad host: {exc}")
    not_found = _deny(request, 404, Outcome.NOT_FOUND, "unknown_vm", "No such VM", "Nothing is served at this address.")
    if vm is None or target.apex:
        return not_found
    if target.vm_name is not None:
        if target.vm_name != vm.name:
            return not_found
    elif target.cname is None or target.cname not in vm.cnames:
        return not_found

    if vm.is_public(target.port):
        # Public: share links play no part (Caddy strips ``ussy_share`` before the app, as it does for anonymous
        # visitors it serves without asking); a signed-in visitor is named.
        return _allow(Access.PUBLIC, session, "public")
    path, query = request.path, request.query
    params = _share_params(query)
    navigating = request.method in ("GET", "HEAD")
    link_valid = bool(params) and all(_link_ok(shares, vm.id, target.port, p, now) for p in params)
    clean_url = _public_url(request, target.host, path, _strip_share_param(query))
    if params and link_valid and navigating:
        token = params[0]
        max_age = SHARE_COOKIE_MAX_AGE
        expiry = next((ln.expires_at for ln in shares.links if ln.valid_for(vm.id, target.port, token, now)), None)
        if expiry is not None:
            max_age = max(1, min(max_age, int((expiry - now).total_seconds())))
        cookie = f"{share_cookie_name(vm.id)}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax"
        if request.scheme == "https":
            cookie += "; Secure"
        return Decision(
            Outcome.REDIRECT, 302, "share_link_set", headers=(("Location", clean_url), ("Set-Cookie", cookie))
        )

    decision = _access(request, vm, target.port, shares, session, bearer, link_valid, now, login_url, clean_url)
    if params and not link_valid:
        if decision.allowed:
            if navigating:  # the app never sees a dead link: drop it from the URL
                return Decision(
                    Outcome.REDIRECT, 302, "share_link_invalid_stripped", headers=(("Location", clean_url),)
                )
            return decision
        if not decision.reason.startswith("bearer"):
            return _deny(
                request,
                403,
                Outcome.FORBIDDEN,
                "share_link_invalid",
                "Invalid share link",
                "This share link is invalid, has expired or was revoked. Ask the VM's owner for a new one.",
            )
    return decision

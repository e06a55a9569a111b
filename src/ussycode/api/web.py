"""Browser-facing HTTP: forward-auth for Caddy, sign-in, hand-off to VM hosts, logout, the apex pages, TLS ask.

Paths (all on the app server behind Caddy):

- ``GET /__ussycode/forward-auth?k=<secret>`` — Caddy asks before proxying a private VM URL. The original request
  arrives as ``X-Forwarded-{Host,Uri,Method,Proto}`` plus the client's Cookie/Authorization. Two paths on every
  VM host are ours: ``/__ussycode/auth?code=…`` (redeem a hand-off code: host-only session cookie, redirect back)
  and ``/__ussycode/logout`` (to the apex). Anything else is :func:`ussycode.api.forward_auth.decide`.
- ``GET /__ussycode/login`` — ``?token=`` (the ``browser`` link) signs in; with a session and ``?next=<VM URL>``
  it hands off to that host; otherwise a page explaining ``ssh <host> browser``.
- ``GET|POST /__ussycode/logout`` — a form (CSRF token), then revoke the session family.
- ``GET /`` — the apex landing page. ``GET /__ussycode/tls-ask?domain=`` — on-demand TLS approval.

Cookies: the session cookie is host-only (no Domain), HttpOnly, SameSite=Lax, and ``__Host-`` prefixed + Secure
unless ``--tls off``, so no VM host can set or overwrite it for the apex or another VM.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import logging
import time
from html import escape
from typing import TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ussycode.api.forward_auth import (
    SHARE_COOKIE_PREFIX,
    SHARE_PARAM,
    AuthRequest,
    BearerView,
    HostError,
    Identity,
    ShareLink,
    ShareView,
    VmView,
    decide,
    normalize_host,
    parse_target,
    tls_ask,
)
from ussycode.api.pages import forwarder_failed_page, vm_state_page
from ussycode.config import Settings, TlsMode, parse_addr
from ussycode.errors import RateLimited, UssyError
from ussycode.proxy.front import UPSTREAM_HEADER
from ussycode.services.accesscache import GenerationCache
from ussycode.services.container import Services
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.routes import ASK_PATH, AUTH_PATH
from ussycode.services.sessions import SessionService, WebSession, session_row
from ussycode.services.shares import AccessRecord, ShareService, access_record

log = logging.getLogger(__name__)
T = TypeVar("T")

LOGIN_PATH = "/__ussycode/login"
LOGOUT_PATH = "/__ussycode/logout"
HANDOFF_PATH = "/__ussycode/auth"
NEXT_COOKIE = "ussy_next"
SECURITY_HEADERS = {
    "Referrer-Policy": "same-origin",  # "no-referrer" would make form posts send "Origin: null"
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}"
    "code,pre{background:#f3f3f3;padding:.1rem .3rem;border-radius:4px}pre{padding:.7rem}"
    "button{font-size:1rem;padding:.4rem 1rem}a{color:#0645ad}.muted{color:#666}"
)


# --- helpers ----------------------------------------------------------------------------------------------------


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _parts(request: Request) -> tuple[Settings, ShareService, SessionService]:
    s = _services(request)
    if s.shares is None or s.sessions is None:
        raise RuntimeError("the HTTPS entry is not set up")
    return s.settings, s.shares, s.sessions


def cookie_name(settings: Settings) -> str:
    return "ussy_session" if settings.tls is TlsMode.OFF else "__Host-ussy_session"


def _cookie(settings: Settings, name: str, value: str, max_age: int) -> str:
    cookie = f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax"
    if settings.tls is not TlsMode.OFF:
        cookie += "; Secure"
    return cookie


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    html = (f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)} · ussycode</title>"
            f"<meta name=viewport content='width=device-width'><style>{_CSS}</style></head>"
            f"<body><h1>{escape(title)}</h1>{body}</body></html>\n")
    return HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def client_ip(request: Request) -> str:
    """The browser's address: Caddy (a loopback peer) sets X-Forwarded-For to it; others are taken as is."""
    peer = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(peer).is_loopback
    except ValueError:
        loopback = False
    forwarded = request.headers.get("x-forwarded-for", "")
    if loopback and forwarded:
        return forwarded.split(",")[-1].strip()[:64]
    return peer


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter | None = getattr(request.app.state, "login_limiter", None)
    if limiter is None:
        limiter = request.app.state.login_limiter = RateLimiter(30, 10)
    return limiter


def _rate_limited(request: Request) -> Response | None:
    try:
        _limiter(request).take("login:" + client_ip(request))
    except RateLimited as exc:
        return _page("Slow down", "<p>Too many sign-in attempts from your address. Wait a minute and retry.</p>",
                     429, {"Retry-After": str(int(exc.retry_after))})
    return None


def _apex_host(settings: Settings) -> str:
    return settings.domain


def _ssh(settings: Settings) -> str:
    _, port = parse_addr(settings.ssh_addr)
    return f"ssh {'' if port == 22 else f'-p {port} '}{settings.domain}"


def _login_command(settings: Settings) -> str:
    return _ssh(settings) + " browser"


async def _apex_session(request: Request) -> WebSession | None:
    settings, _, sessions = _parts(request)
    return await sessions.validate(request.cookies.get(cookie_name(settings)), _apex_host(settings))


def _host_of(request: Request) -> str | None:
    try:
        return normalize_host(request.headers.get("host", ""))
    except HostError:
        return None


# --- forward-auth -----------------------------------------------------------------------------------------------


def _safe_path(value: str) -> str:
    """A same-host path to go back to ("/" for anything else: no scheme, no //host, no backslash tricks)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or any(ord(c) < 32 for c in value):
        return "/"
    return value[:2000]


async def _bearer(services: Services, token: str | None, vm_name: str, client: str) -> BearerView | None:
    """Raises RateLimited when ``client`` sent too many bad tokens."""
    if token is None:
        return None
    tokens = services.tokens
    if tokens is None or not token:
        return BearerView(False)
    actor = await tokens.authenticate_for_vm(token, vm_name, client=client)
    if actor is None:
        return BearerView(False)
    return BearerView(True, Identity(actor.id, actor.handle, actor.user.email))


async def forward_auth(request: Request) -> Response:
    settings, shares, sessions = _parts(request)
    services = _services(request)
    routes = services.routes
    if routes is None:
        return PlainTextResponse("not ready", 503)
    if not hmac.compare_digest(request.query_params.get("k", ""), routes.auth_key):
        return PlainTextResponse("forbidden", 403)
    areq = AuthRequest.from_headers(request.headers)
    try:
        target = parse_target(areq.host, settings.domain)
    except HostError:
        return JSONResponse({"error": "bad host", "code": 400}, 400)
    session_secret = areq.cookies.get(cookie_name(settings))
    # Only the share links this request presents are read (cookies and the URL).
    presented = tuple({v for k, v in areq.cookies.items() if k.startswith(SHARE_COOKIE_PREFIX)}
                      | {v for k, v in _query_pairs(areq.query) if k == SHARE_PARAM})

    def read(c: sa.Connection) -> tuple[AccessRecord | None, WebSession | None]:
        rec = access_record(c, vm_name=target.vm_name, cname=target.cname, link_tokens=presented)
        return rec, (session_row(c, session_secret, target.host) if rec is not None else None)

    cache = _access_cache(request)
    key = (target.host, session_secret, presented)
    generation = services.store.generation
    cached = cache.get(key, generation)
    if cached is None:
        cached = await services.store.read(read)
        session_until = None
        if cached[1] is not None:  # never past the session's own expiry
            left = (cached[1].expires_at - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()
            session_until = time.monotonic() + left
        cache.put(key, generation, cached, session_until)
    record, session = cached

    # Our own paths on every VM host.
    if areq.path == HANDOFF_PATH and record is not None and areq.method in ("GET", "HEAD"):
        return await _redeem_handoff(request, areq.query, target.host, areq.scheme)
    if areq.path == LOGOUT_PATH and record is not None:
        return RedirectResponse(settings.public_url(settings.domain) + LOGOUT_PATH, 302, headers=SECURITY_HEADERS)

    now = dt.datetime.now(dt.UTC)
    vm = shares_view = None
    if record is not None:
        vm = VmView(record.vm_id, record.name, record.owner_id, public=8080 in record.public_ports,
                    public_ports=frozenset(p for p in record.public_ports if p != 8080), cnames=record.cnames)
        shares_view = ShareView(record.user_ids, record.emails, tuple(
            ShareLink(token, record.vm_id, None if exp is None else exp.replace(tzinfo=dt.UTC))
            for token, exp in record.links))
    identity = None if session is None else Identity(session.user_id, session.handle, session.email)
    try:
        bearer = await _bearer(services, areq.bearer_token, record.name, client_ip(request)) if record else None
    except RateLimited as exc:
        return JSONResponse({"error": exc.user_message, "code": 429}, 429,
                            headers={"Retry-After": str(int(exc.retry_after) + 1), "Cache-Control": "no-store"})
    decision = decide(areq, domain=settings.domain, vm=vm, shares=shares_view or ShareView(), session=identity,
                      bearer=bearer, now=now, login_url=settings.public_url(settings.domain) + LOGIN_PATH)
    if decision.reason == "share_link_set" and record is not None:
        token = next((v for k, v in _query_pairs(areq.query) if k == "ussy_share"), "")
        if token:
            await shares.count_link_use(token)
    headers = dict(decision.headers)
    if decision.allowed and record is not None:
        page = vm_state_page(record.name, record.status, accept=areq.accept, method=areq.method)
        if page is None:
            try:
                headers[UPSTREAM_HEADER] = await routes.ensure_bridge(record.vm_id, target.port)
            except (UssyError, OSError) as exc:
                log.warning("forwarder for %s:%d failed: %s", record.name, target.port, exc)
                page = forwarder_failed_page(record.name, accept=areq.accept, method=areq.method)
        if page is not None:
            return Response(page.body, status_code=page.status, media_type=page.content_type,
                            headers={"Cache-Control": "no-store", **dict(page.headers)})
    if decision.status >= 300:
        headers.update({"Cache-Control": "no-store"})
    return Response(decision.body, status_code=decision.status, headers=headers, media_type=decision.content_type)


def _access_cache(request: Request) -> GenerationCache[tuple[AccessRecord | None, WebSession | None]]:
    cache: GenerationCache[tuple[AccessRecord | None, WebSession | None]] | None = getattr(
        request.app.state, "access_cache", None)
    if cache is None:
        cache = request.app.state.access_cache = GenerationCache(max_entries=8192, ttl=5.0)
    return cache


def _query_pairs(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)


async def _redeem_handoff(request: Request, query: str, host: str, scheme: str) -> Response:
    settings, _, sessions = _parts(request)
    limited = _rate_limited(request)
    if limited is not None:
        return limited
    params = dict(_query_pairs(query))
    next_path = _safe_path(params.get("next", "/"))
    result = await sessions.redeem_handoff(params.get("code", ""), host)
    if result is None:
        retry = settings.public_url(settings.domain) + LOGIN_PATH + "?" + urlencode(
            {"next": settings.public_url(host) + next_path})
        return _page("Sign-in link expired",
                     f"<p>This sign-in hand-off is invalid, used or expired.</p><p><a href='{escape(retry)}'>"
                     "Try again</a></p>", 400)
    secret, session = result
    max_age = max(60, int((session.expires_at - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()))
    headers = {**SECURITY_HEADERS, "Location": next_path,
               "Set-Cookie": _cookie(settings, cookie_name(settings), secret, max_age)}
    return Response("", status_code=302, headers=headers)


# --- sign-in on the apex ----------------------------------------------------------------------------------------


async def _vm_next(request: Request, next_url: str) -> tuple[str, str] | None:
    """(host, path) if ``next_url`` is a URL of ours that a session may be handed to (a VM host or a verified
    custom domain, our scheme); None otherwise (never an open redirect)."""
    settings, shares, _ = _parts(request)
    try:
        parts = urlsplit(next_url)
        if parts.scheme != settings.public_scheme or not parts.hostname:
            return None
        target = parse_target(parts.netloc, settings.domain)
    except (ValueError, HostError):
        return None
    if target.vm_name is not None:
        record = await shares.lookup(vm_name=target.vm_name)
    elif target.cname is not None:
        record = await shares.lookup(cname=target.cname)
    else:
        return None
    if record is None:
        return None
    path = _safe_path((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    return target.host, path


async def _handoff_redirect(request: Request, session: WebSession, host: str, path: str) -> Response:
    settings, _, sessions = _parts(request)
    code = await sessions.create_handoff(session, host)
    location = settings.public_url(host) + HANDOFF_PATH + "?" + urlencode({"code": code, "next": path})
    return RedirectResponse(location, 303, headers=SECURITY_HEADERS)


async def login(request: Request) -> Response:
    settings, _, sessions = _parts(request)
    if _host_of(request) != _apex_host(settings):
        return PlainTextResponse("not found", 404)
    token = request.query_params.get("token")
    next_url = request.query_params.get("next", "")
    if token is not None:
        limited = _rate_limited(request)
        if limited is not None:
            return limited
        result = await sessions.redeem_login_token(token, _apex_host(settings), client=client_ip(request))
        if result is None:
            return _page("Sign-in link invalid",
                         "<p>This sign-in link is invalid, was already used, or expired (links last 5 minutes).</p>"
                         f"<p>Get a new one with <code>{escape(_login_command(settings))}</code>.</p>", 400)
        secret, new_session = result
        cookie = _cookie(settings, cookie_name(settings), secret,
                         int((new_session.expires_at - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()))
        target = await _vm_next(request, unquote(request.cookies.get(NEXT_COOKIE, "")))
        if target is not None:
            response = await _handoff_redirect(request, new_session, *target)
        else:
            response = RedirectResponse("/", 303, headers=SECURITY_HEADERS)
        response.headers.append("Set-Cookie", cookie)
        response.headers.append("Set-Cookie", _cookie(settings, NEXT_COOKIE, "", 0))
        return response
    session = await _apex_session(request)
    target = await _vm_next(request, next_url) if next_url else None
    if session is not None:
        if target is not None:
            return await _handoff_redirect(request, session, *target)
        return RedirectResponse("/", 303, headers=SECURITY_HEADERS)
    extra: dict[str, str] = {}
    where = ""
    if target is not None:
        # Remember where the browser wanted to go; the sign-in link brings it back there.
        extra["Set-Cookie"] = _cookie(settings, NEXT_COOKIE, quote(next_url, safe=""), 900)
        where = f"<p class=muted>You wanted to open <code>{escape(settings.public_url(target[0]) + target[1])}</code>."\
                " You will be taken there after signing in.</p>"
    body = (
        "<p>This page is private. Sign in with your SSH key:</p>"
        f"<pre>{escape(_login_command(settings))}</pre>"
        "<p>and open the link it prints in this browser (it works once, for 5 minutes).</p>"
        f"{where}<p class=muted>No account yet? <code>{escape(_ssh(settings))}</code> to create one.</p>"
    )
    return _page("Sign in to ussycode", body, 200, extra)


async def logout(request: Request) -> Response:
    settings, _, sessions = _parts(request)
    if _host_of(request) != _apex_host(settings):
        return PlainTextResponse("not found", 404)
    session = await _apex_session(request)
    if request.method == "GET":
        if session is None:
            return _page("Signed out", "<p>You are not signed in.</p><p><a href='/'>Home</a></p>")
        form = (f"<form method=post action='{LOGOUT_PATH}'><input type=hidden name=csrf "
                f"value='{sessions.csrf_token(session)}'><button id=logout type=submit>Sign out</button></form>")
        return _page("Sign out", f"<p>Signed in as <b>{escape(session.handle)}</b>. Sign out of this browser "
                     f"(the apex and every VM URL)?</p>{form}")
    origin = request.headers.get("origin")
    if origin is not None and origin != settings.public_url(settings.domain):
        return _page("Refused", "<p>Cross-site request refused.</p>", 403)
    form_data = await request.form()
    csrf = str(form_data.get("csrf", ""))
    if session is None:
        return _page("Signed out", "<p>You are not signed in.</p>", 200,
                     {"Set-Cookie": _cookie(settings, cookie_name(settings), "", 0)})
    if not sessions.check_csrf(session, csrf):
        return _page("Refused", "<p>The form expired or did not come from this site. Reload and retry.</p>", 403)
    await sessions.revoke_family(session)
    return _page("Signed out", "<p>You are signed out of this browser, on the apex and every VM URL.</p>"
                 "<p><a href='/'>Home</a></p>", 200,
                 {"Set-Cookie": _cookie(settings, cookie_name(settings), "", 0)})


async def landing(request: Request) -> Response:
    settings, _, sessions = _parts(request)
    if _host_of(request) != _apex_host(settings):
        return PlainTextResponse("not found", 404)
    session = await _apex_session(request)
    intro = ("<p>Self-hosted dev environments: <code>ssh</code> in, type <code>new</code>, get a VM with a persistent "
             "disk and an HTTPS URL.</p>")
    if session is None:
        body = intro + (f"<pre>{escape(_ssh(settings))}</pre><p>Already have an account? "
                        f"<a href='{LOGIN_PATH}'>Sign in</a> with <code>{escape(_login_command(settings))}</code>.</p>")
        return _page("ussycode", body)
    services = _services(request)
    from ussycode.store import vms as vmq

    vms = await services.store.read(lambda c: vmq.of_owner(c, session.user_id))
    items = "".join(
        f"<li><a href='{escape(services.vms.url(v.name))}/'>{escape(v.name)}</a> "
        f"<span class=muted>{escape(str(v.status))}</span></li>" for v in vms
    ) or "<li class=muted>no VMs yet: <code>new</code> in the lobby</li>"
    body = (f"<p>Signed in as <b id=handle>{escape(session.handle)}</b>.</p><h2>Your VMs</h2><ul>{items}</ul>"
            f"<p><a href='{LOGOUT_PATH}'>Sign out</a></p>")
    return _page("ussycode", body)


# Certificates for names under the domain that name no VM (so an unknown host answers its 404 over TLS), from
# the local CA only, and only this many: a flood of random names must not fill the certificate storage.
UNKNOWN_NAME_CERTS_PER_MINUTE, UNKNOWN_NAME_CERTS_BURST = 2, 20


def _unknown_name_cert(request: Request, host: str, settings: Settings) -> bool:
    if settings.tls is not TlsMode.INTERNAL:
        return False  # a public CA's rate limits are not ours to spend on names that serve nothing
    try:
        target = parse_target(host, settings.domain)
    except HostError:
        return False
    if target.apex or target.cname is not None or "." in target.host[: -len(settings.domain) - 1]:
        return False
    limiter: RateLimiter | None = getattr(request.app.state, "unknown_cert_limiter", None)
    if limiter is None:
        limiter = request.app.state.unknown_cert_limiter = RateLimiter(UNKNOWN_NAME_CERTS_PER_MINUTE,
                                                                       UNKNOWN_NAME_CERTS_BURST)
    try:
        limiter.take("unknown-names")
    except RateLimited:
        return False
    return True


async def tls_ask_endpoint(request: Request) -> Response:
    """On-demand TLS permission (Caddy's ``permission`` http module): 200 = issue a certificate for ``domain``.
    Yes for the apex, VM hosts and their port hosts, verified custom domains; with the local CA also, rate
    limited, for other single names under the domain (they answer 404)."""
    settings, shares, _ = _parts(request)
    host = request.query_params.get("domain", "")
    ok = tls_ask(host, settings.domain, await shares.vm_names(), await shares.verified_cnames())
    if not ok:
        ok = _unknown_name_cert(request, host, settings)
    return PlainTextResponse("ok" if ok else "no", 200 if ok else 403)


def routes() -> list[BaseRoute]:
    return [
        Route("/", landing, methods=["GET"]),
        Route(AUTH_PATH, forward_auth, methods=["GET"]),
        Route(LOGIN_PATH, login, methods=["GET"]),
        Route(LOGOUT_PATH, logout, methods=["GET", "POST"]),
        Route(ASK_PATH, tls_ask_endpoint, methods=["GET"]),
    ]

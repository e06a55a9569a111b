"""Browser-facing HTTP: sign-in, hand-off to VM hosts, logout, the apex pages, TLS ask (and the routes of
forward-auth, :mod:`ussycode.api.auth_endpoint`).

Paths (all on the app server behind Caddy):

- ``GET /__ussycode/forward-auth?k=<secret>`` — Caddy asks before proxying a VM URL its own paths do not serve
  (:func:`ussycode.api.auth_endpoint.forward_auth`).
- ``/__ussycode/*`` on every VM host (public ones too) is sent here by Caddy, never to the VM:
  ``/__ussycode/auth?code=…`` redeems a hand-off code (host-only session cookie for that VM, redirect back) and
  ``/__ussycode/logout`` goes to the apex.
- ``GET /__ussycode/login`` — ``?token=`` (the ``browser`` link) signs in; with a session and ``?next=<VM URL>``
  it hands off to that host; otherwise a page explaining ``ssh <host> browser``.
- ``GET|POST /__ussycode/logout`` — a form (CSRF token), then revoke the session family.
- ``GET /`` — the apex landing page. ``GET /__ussycode/tls-ask?domain=`` — on-demand TLS approval.

Cookies: the session cookie is host-only (no Domain), HttpOnly, SameSite=Lax, and ``__Host-`` prefixed + Secure
unless ``--tls off``, so no VM host can set or overwrite it for the apex or another VM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from html import escape
from typing import TypeVar
from urllib.parse import quote, unquote, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ussycode.api.auth_endpoint import LOGIN_PATH, access_views, forward_auth
from ussycode.api.context import client_address, cookie_header, services_of, web_parts
from ussycode.api.forward_auth import (
    Identity,
    may_open,
)
from ussycode.api.hostnames import HostError, Target, normalize_host, parse_target, tls_ask
from ussycode.config import Settings, TlsMode, parse_addr
from ussycode.errors import RateLimited
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.routes import ASK_PATH, AUTH_PATH
from ussycode.services.sessions import WebSession, cookie_name
from ussycode.services.shares import AccessRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    html = (f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)} · ussycode</title>"
            f"<meta name=viewport content='width=device-width'><style>{_CSS}</style></head>"
            f"<body><h1>{escape(title)}</h1>{body}</body></html>\n")
    return HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter | None = getattr(request.app.state, "login_limiter", None)
    if limiter is None:
        limiter = request.app.state.login_limiter = RateLimiter(30, 10, name="sign_in")
    return limiter


def _rate_limited(request: Request) -> Response | None:
    try:
        _limiter(request).take("login:" + client_address(request))
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
    settings, _, sessions = web_parts(request)
    return await sessions.validate(request.cookies.get(cookie_name(settings)), _apex_host(settings))


def _host_of(request: Request) -> str | None:
    try:
        return normalize_host(request.headers.get("host", ""))
    except HostError:
        return None


# --- hand-off to VM hosts -----------------------------------------------------------------------------------------


def _safe_path(value: str) -> str:
    """A same-host path to go back to ("/" for anything else: no scheme, no //host, no backslash tricks)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or any(ord(c) < 32 for c in value):
        return "/"
    return value[:2000]


async def _vm_host(request: Request) -> tuple[Target, AccessRecord] | None:
    """The VM host this request came to (by name or verified custom domain) and its record; None for the apex,
    unknown hosts and bad Host headers."""
    settings, shares, _ = web_parts(request)
    try:
        target = parse_target(request.headers.get("host", ""), settings.domain)
    except HostError:
        return None
    if target.apex or (target.vm_name is None and target.cname is None):
        return None
    record = await shares.lookup(vm_name=target.vm_name, cname=target.cname)
    return None if record is None else (target, record)


async def handoff(request: Request) -> Response:
    """``/__ussycode/auth?code=…&next=/path`` on a VM host: redeem the apex's hand-off code for a session cookie
    of this host and VM, then go back to the page."""
    settings, _, sessions = web_parts(request)
    found = await _vm_host(request)
    if found is None:
        return PlainTextResponse("not found", 404, headers=SECURITY_HEADERS)
    target, record = found
    limited = _rate_limited(request)
    if limited is not None:
        return limited
    host = target.host
    next_path = _safe_path(request.query_params.get("next", "/"))
    result = await sessions.redeem_handoff(request.query_params.get("code", ""), host, record.vm_id)
    if result is None:
        retry = settings.public_url(settings.domain) + LOGIN_PATH + "?" + urlencode(
            {"next": settings.public_url(host) + next_path})
        return _page("Sign-in link expired",
                     f"<p>This sign-in hand-off is invalid, used or expired.</p><p><a href='{escape(retry)}'>"
                     "Try again</a></p>", 400)
    secret, session = result
    max_age = max(60, int(session.seconds_left))
    headers = {**SECURITY_HEADERS, "Location": next_path,
               "Set-Cookie": cookie_header(settings, cookie_name(settings), secret, max_age)}
    return Response("", status_code=302, headers=headers)


# --- sign-in on the apex ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Next:
    """A VM URL of ours that the browser wants to go to after sign-in."""

    host: str
    path: str
    port: int
    record: AccessRecord


async def _vm_next(request: Request, next_url: str) -> _Next | None:
    """The VM URL ``next_url`` names if it is one of ours (a VM host or a verified custom domain, our scheme);
    None otherwise (never an open redirect)."""
    settings, shares, _ = web_parts(request)
    try:
        parts = urlsplit(next_url)
        if parts.scheme != settings.public_scheme or not parts.hostname:
            return None
        target = parse_target(parts.netloc, settings.domain)
    except (ValueError, HostError):
        return None
    if target.vm_name is None and target.cname is None:
        return None
    record = await shares.lookup(vm_name=target.vm_name, cname=target.cname)
    if record is None:
        return None
    path = _safe_path((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    return _Next(target.host, path, target.port, record)


def _apex_next(value: str) -> str:
    """A page of the apex to return to after signing in: the admin panel's paths only, else home."""
    path = _safe_path(value) if value else "/"
    return path if path == "/admin" or path.startswith("/admin/") else "/"


async def _handoff_redirect(request: Request, session: WebSession, target: _Next) -> Response:
    """Hand the session to a VM host the user may open (public, owner, shared); anything else goes home."""
    settings, _, sessions = web_parts(request)
    vm, shares_view = access_views(target.record)
    if not may_open(vm, target.port, shares_view, Identity(session.user_id, session.handle, session.email)):
        # No hand-off code for a host this user may not open (a share link works without one).
        return _page("No access", f"<p>You are signed in as <b>{escape(session.handle)}</b>, but "
                     f"<code>{escape(target.host)}</code> is not shared with you. Ask its owner to run "
                     f"<code>share add {escape(vm.name)} {escape(session.handle)}</code>.</p>"
                     "<p><a href='/'>Your VMs</a></p>", 403)
    code = await sessions.create_handoff(session, target.host, target.record.vm_id)
    location = settings.public_url(target.host) + HANDOFF_PATH + "?" + urlencode({"code": code,
                                                                                  "next": target.path})
    return RedirectResponse(location, 303, headers=SECURITY_HEADERS)


async def login(request: Request) -> Response:
    settings, _, sessions = web_parts(request)
    if _host_of(request) != _apex_host(settings):
        return PlainTextResponse("not found", 404)
    token = request.query_params.get("token")
    next_url = request.query_params.get("next", "")
    if token is not None:
        limited = _rate_limited(request)
        if limited is not None:
            return limited
        result = await sessions.redeem_login_token(token, _apex_host(settings), client=client_address(request))
        if result is None:
            return _page("Sign-in link invalid",
                         "<p>This sign-in link is invalid, was already used, or expired (links last 5 minutes).</p>"
                         f"<p>Get a new one with <code>{escape(_login_command(settings))}</code>.</p>", 400)
        secret, new_session = result
        cookie = cookie_header(settings, cookie_name(settings), secret, int(new_session.seconds_left))
        remembered = unquote(request.cookies.get(NEXT_COOKIE, ""))
        target = await _vm_next(request, remembered)
        if target is not None:
            response = await _handoff_redirect(request, new_session, target)
        else:
            response = RedirectResponse(_apex_next(remembered), 303, headers=SECURITY_HEADERS)
        response.headers.append("Set-Cookie", cookie)
        response.headers.append("Set-Cookie", cookie_header(settings, NEXT_COOKIE, "", 0))
        return response
    session = await _apex_session(request)
    target = await _vm_next(request, next_url) if next_url else None
    if session is not None:
        if target is not None:
            return await _handoff_redirect(request, session, target)
        return RedirectResponse(_apex_next(next_url), 303, headers=SECURITY_HEADERS)
    extra: dict[str, str] = {}
    where = ""
    if target is None and _apex_next(next_url) != "/":
        # A page of the apex itself (the admin panel): back there after signing in.
        extra["Set-Cookie"] = cookie_header(settings, NEXT_COOKIE, quote(_apex_next(next_url), safe=""), 900)
    if target is not None:
        # Remember where the browser wanted to go; the sign-in link brings it back there.
        extra["Set-Cookie"] = cookie_header(settings, NEXT_COOKIE, quote(next_url, safe=""), 900)
        wanted = escape(settings.public_url(target.host) + target.path)
        where = f"<p class=muted>You wanted to open <code>{wanted}</code>. You go there after signing in.</p>"
    body = (
        "<p>This page is private. Sign in with your SSH key:</p>"
        f"<pre>{escape(_login_command(settings))}</pre>"
        "<p>and open the link it prints in this browser (it works once, for 5 minutes).</p>"
        f"{where}<p class=muted>No account yet? <code>{escape(_ssh(settings))}</code> to create one.</p>"
    )
    return _page("Sign in to ussycode", body, 200, extra)


async def logout(request: Request) -> Response:
    settings, _, sessions = web_parts(request)
    if _host_of(request) != _apex_host(settings):
        if await _vm_host(request) is None:
            return PlainTextResponse("not found", 404)
        # Signing out is done on the apex (it ends the VM-host sessions too).
        return RedirectResponse(settings.public_url(settings.domain) + LOGOUT_PATH, 302, headers=SECURITY_HEADERS)
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
                     {"Set-Cookie": cookie_header(settings, cookie_name(settings), "", 0)})
    if not sessions.check_csrf(session, csrf):
        return _page("Refused", "<p>The form expired or did not come from this site. Reload and retry.</p>", 403)
    await sessions.revoke_family(session)
    return _page("Signed out", "<p>You are signed out of this browser, on the apex and every VM URL.</p>"
                 "<p><a href='/'>Home</a></p>", 200,
                 {"Set-Cookie": cookie_header(settings, cookie_name(settings), "", 0)})


async def landing(request: Request) -> Response:
    settings, _, sessions = web_parts(request)
    if _host_of(request) != _apex_host(settings):
        return PlainTextResponse("not found", 404)
    session = await _apex_session(request)
    intro = ("<p>Self-hosted dev environments: <code>ssh</code> in, type <code>new</code>, get a VM with a persistent "
             "disk and an HTTPS URL.</p>")
    if session is None:
        body = intro + (f"<pre>{escape(_ssh(settings))}</pre><p>Already have an account? "
                        f"<a href='{LOGIN_PATH}'>Sign in</a> with <code>{escape(_login_command(settings))}</code>.</p>")
        return _page("ussycode", body)
    services = services_of(request)
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
                                                                       UNKNOWN_NAME_CERTS_BURST, name="tls_ask")
    try:
        limiter.take("unknown-names")
    except RateLimited:
        return False
    return True


async def tls_ask_endpoint(request: Request) -> Response:
    """On-demand TLS permission (Caddy's ``permission`` http module): 200 = issue a certificate for ``domain``.
    Yes for the apex, VM hosts and their port hosts, verified custom domains; with the local CA also, rate
    limited, for other single names under the domain (they answer 404)."""
    settings, shares, _ = web_parts(request)
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
        Route(HANDOFF_PATH, handoff, methods=["GET"]),
        Route(ASK_PATH, tls_ask_endpoint, methods=["GET"]),
    ]

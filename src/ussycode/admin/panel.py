"""The admin panel at ``https://<domain>/admin/``: server-rendered (Jinja2), no JavaScript, every form CSRF-checked.

Who may open it: a browser signed in on the apex (the ``browser`` command's session) whose account is an operator
or an admin *now* (read from the database on every request); anyone else gets ``403``, a browser without a
session is sent to sign in and comes back here. Every action goes through :class:`~ussycode.services.admin.
AdminService`, so the panel obeys the same role rules (``auth.policy``) as the lobby's ``admin`` commands.

A POST is accepted only with the session's CSRF token (a hidden field the attacker's page cannot read) and, when
the browser sends them, an ``Origin`` equal to the apex origin and ``Sec-Fetch-Site: same-origin``: a VM app on
``<vm>.<domain>`` is same-site with the apex, so SameSite cookies alone would not stop it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ussycode.admin import exports
from ussycode.auth.identity import Actor
from ussycode.auth.policy import Action, can
from ussycode.errors import UsageError, UssyError
from ussycode.services.admin import AdminService
from ussycode.services.container import Services
from ussycode.services.sessions import WebSession, cookie_name
from ussycode.types import TrustLevel, VmStatus

log = logging.getLogger(__name__)

PREFIX = "/admin"
PAGE = 50
MAX_FORM = 16_384
NAV = [(f"{PREFIX}/", "dashboard"), (f"{PREFIX}/users", "users"), (f"{PREFIX}/vms", "VMs"),
       (f"{PREFIX}/shares", "shares"), (f"{PREFIX}/tokens", "tokens"), (f"{PREFIX}/llm", "LLM"),
       (f"{PREFIX}/audit?action=mail.", "mail"),
       (f"{PREFIX}/audit", "audit log")]
HEADERS = {
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
LOGIN_PATH = "/__ussycode/login"

_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True), auto_reload=False)


class _Denied(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _admin(request: Request) -> AdminService:
    svc = _services(request).admin
    if svc is None:
        raise _Denied(PlainTextResponse("the admin panel is not available", 503))
    return svc


def _plain(status: int, title: str, text: str) -> HTMLResponse:
    body = (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head><body>"
            f"<h1>{title}</h1><p>{text}</p></body></html>\n")
    return HTMLResponse(body, status, headers=HEADERS)


async def _signed_in(request: Request) -> tuple[Actor, WebSession]:
    """The acting operator/admin and their session, or :class:`_Denied` with the answer to give."""
    s = _services(request)
    if s.sessions is None:
        raise _Denied(PlainTextResponse("not ready", 503))
    host = request.headers.get("host", "").split(":")[0].lower()
    if host != s.settings.domain:
        raise _Denied(PlainTextResponse("not found", 404))
    session = await s.sessions.validate(request.cookies.get(cookie_name(s.settings)), s.settings.domain)
    if session is None:
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _Denied(RedirectResponse(f"{LOGIN_PATH}?{urlencode({'next': target})}", 303, headers=HEADERS))
        raise _Denied(_plain(401, "Sign in first", "Your session ended. Sign in again with the browser command."))
    user = await s.users.by_id(session.user_id)
    actor = Actor(user=user, source="admin") if user is not None else None
    if actor is None or not can(actor, Action.ADMIN_COMMANDS):
        raise _Denied(_plain(403, "Operators only",
                             "The admin panel is for the operators and admins of this server."))
    return actor, session


def _check_post(request: Request, session: WebSession, form: Any) -> None:
    s = _services(request)
    assert s.sessions is not None
    origin = request.headers.get("origin")
    if origin is not None and origin != s.settings.public_url(s.settings.domain):
        raise _Denied(_plain(403, "Refused", "This form was sent from another site."))
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise _Denied(_plain(403, "Refused", "This form was sent from another site."))
    if not s.sessions.check_csrf(session, str(form.get("csrf", ""))):
        raise _Denied(_plain(403, "Refused", "The form's security token is missing or stale. Reload the page."))


def render(request: Request, template: str, actor: Actor, session: WebSession, title: str, active: str,
           **values: Any) -> HTMLResponse:
    s = _services(request)
    assert s.sessions is not None
    flash = request.query_params.get("ok") or request.query_params.get("error") or ""
    html = _env.get_template(template).render(
        title=title, nav=NAV, active=active, me=actor.user, csrf=s.sessions.csrf_token(session),
        flash=flash[:300], flash_kind="bad" if "error" in request.query_params else "ok", **values)
    return HTMLResponse(html, 200, headers=HEADERS)


Page = Callable[[Request, Actor, WebSession], Awaitable[Response]]


def page(fn: Page) -> Callable[[Request], Awaitable[Response]]:
    """A GET page: signed-in staff only; service refusals become a page with the reason."""

    async def endpoint(request: Request) -> Response:
        try:
            actor, session = await _signed_in(request)
            return await fn(request, actor, session)
        except _Denied as denied:
            return denied.response
        except UssyError as exc:
            return _plain(exc.http_status, "Refused" if exc.http_status == 403 else "Error", exc.user_message)

    return endpoint


Action_ = Callable[[Request, Actor, dict[str, str]], Awaitable[str]]


def action(fn: Action_) -> Callable[[Request], Awaitable[Response]]:
    """A form POST: staff, CSRF checked; then back to the page it came from with the outcome shown."""

    async def endpoint(request: Request) -> Response:
        try:
            actor, session = await _signed_in(request)
            if int(request.headers.get("content-length") or 0) > MAX_FORM:
                return _plain(413, "Too large", "That form is too large.")
            async with request.form(max_files=0, max_fields=20) as form:
                _check_post(request, session, form)
                fields = {k: str(v)[:1000] for k, v in form.items()}
        except _Denied as denied:
            return denied.response
        try:
            message = await fn(request, actor, fields)
            return RedirectResponse(f"{_back(request)}?{urlencode({'ok': message})}", 303, headers=HEADERS)
        except UssyError as exc:
            return RedirectResponse(f"{_back(request, ok=False)}?{urlencode({'error': exc.user_message})}", 303,
                                    headers=HEADERS)

    return endpoint


def _back(request: Request, ok: bool = True) -> str:
    """Where an action returns: the object's page, or its list when the object is gone (or is a token). A refused
    removal goes back to the object's page, where the form is."""
    parts = request.url.path.strip("/").split("/")  # admin, users, <handle>, trust
    if parts[1] == "tokens" or (ok and parts[-1] in ("delete", "rm")):
        return f"/{parts[0]}/{parts[1]}"
    return "/" + "/".join(parts[:-1])


def _int(value: str | None, default: int = 1, lo: int = 1, hi: int = 100_000) -> int:
    try:
        return max(lo, min(hi, int(value or default)))
    except ValueError:
        return default


def _pages(request: Request, pg: int, total: int | None) -> dict[str, Any]:
    def url(n: int) -> str:
        params = {k: v for k, v in request.query_params.items() if k not in ("page", "ok", "error")}
        return f"{request.url.path}?{urlencode({**params, 'page': n})}"

    last = max(1, -(-(total or 0) // PAGE))
    return {"pg": pg, "total": total, "prev_url": url(pg - 1) if pg > 1 else "",
            "next_url": url(pg + 1) if pg < last else ""}


# --- pages ---------------------------------------------------------------------------------------------------------

@page
async def dashboard(request: Request, actor: Actor, session: WebSession) -> Response:
    stats = await _admin(request).stats(actor)
    states: dict[str, int] = {}
    for state, _runtime, n in stats["vms_by_state"]:
        states[state] = states.get(state, 0) + n
    return render(request, "dashboard.html", actor, session, "Dashboard", "dashboard", s=stats,
                  h=stats["host"], vm_states=states)


@page
async def users(request: Request, actor: Actor, session: WebSession) -> Response:
    q = request.query_params
    pg = _int(q.get("page"))
    tier = q.get("tier", "")
    result = await _admin(request).list_users(actor, search=q.get("q", "")[:100], tier=tier,
                                              suspended=True if q.get("suspended") else None,
                                              offset=(pg - 1) * PAGE, limit=PAGE)
    return render(request, "users.html", actor, session, "Users", "users", page=result, q=q.get("q", ""),
                  tier=tier, suspended=bool(q.get("suspended")), tiers=[t.value for t in TrustLevel],
                  **_pages(request, pg, result.total))


@page
async def user(request: Request, actor: Actor, session: WebSession) -> Response:
    detail = await _admin(request).user(actor, request.path_params["handle"])
    return render(request, "user.html", actor, session, detail.user.handle, "users", d=detail,
                  tiers=[t.value for t in TrustLevel])


@page
async def vms(request: Request, actor: Actor, session: WebSession) -> Response:
    q = request.query_params
    pg = _int(q.get("page"))
    result = await _admin(request).list_vms(actor, owner=q.get("owner", "")[:40], status=q.get("status", ""),
                                            search=q.get("q", "")[:100], offset=(pg - 1) * PAGE, limit=PAGE)
    return render(request, "vms.html", actor, session, "VMs", "VMs", page=result, q=q.get("q", ""),
                  owner=q.get("owner", ""), status=q.get("status", ""), statuses=[s.value for s in VmStatus],
                  **_pages(request, pg, result.total))


@page
async def vm(request: Request, actor: Actor, session: WebSession) -> Response:
    svc = _admin(request)
    name = request.path_params["name"]
    found = await svc.list_vms(actor, search=name, limit=PAGE)
    row = next((r for r in found.rows if r["name"] == name), None)
    if row is None:
        return _plain(404, "No such VM", "There is no VM of that name.")
    console = await svc.console_tail(actor, name)
    return render(request, "vm.html", actor, session, name, "VMs", v=row, console=console)


@page
async def shares(request: Request, actor: Actor, session: WebSession) -> Response:
    data = await _admin(request).list_shares(actor)
    return render(request, "simple.html", actor, session, "Shares and custom domains", "shares", sh=data)


@page
async def tokens(request: Request, actor: Actor, session: WebSession) -> Response:
    pg = _int(request.query_params.get("page"))
    result = await _admin(request).list_tokens(actor, offset=(pg - 1) * PAGE, limit=PAGE)
    return render(request, "simple.html", actor, session, "Active API tokens", "tokens", token_rows=result.rows,
                  **_pages(request, pg, result.total))


@page
async def audit(request: Request, actor: Actor, session: WebSession) -> Response:
    f = exports.audit_filters(request.query_params)
    before = request.query_params.get("before")
    result = await _admin(request).audit(actor, **exports.audit_query(f),
                                         before=_int(before, hi=2**62) if before else None, limit=PAGE)
    params = {k: v for k, v in request.query_params.items() if k not in ("before", "ok", "error")}
    next_url = f"{PREFIX}/audit?{urlencode({**params, 'before': result.next_before})}" if result.next_before else ""
    mail = f["action"] == "mail."
    return render(request, "audit.html", actor, session, "Mail" if mail else "Audit log",
                  "mail" if mail else "audit log", page=result, f=f,
                  csv_url=f"{PREFIX}/audit.csv?{urlencode(params)}", pg=1, total=None,
                  prev_url=f"{PREFIX}/audit?{urlencode(params)}" if before else "", next_url=next_url)


@page
async def llm_usage(request: Request, actor: Actor, session: WebSession) -> Response:
    days = _int(request.query_params.get("days"), default=7, hi=366)
    rows = await _admin(request).llm_usage(actor, days)
    return render(request, "llm.html", actor, session, f"LLM usage, last {days} days", "LLM", rows=rows, days=days)


@page
async def audit_csv(request: Request, actor: Actor, session: WebSession) -> Response:
    return await exports.audit_csv(_admin(request), actor, request.query_params)


# --- actions -------------------------------------------------------------------------------------------------------

@action
async def set_trust(request: Request, actor: Actor, form: dict[str, str]) -> str:
    changed = await _admin(request).set_trust(actor, request.path_params["handle"], form.get("tier", ""))
    return f"{changed.handle} is now {changed.trust_level}"


@action
async def set_quota(request: Request, actor: Actor, form: dict[str, str]) -> str:
    values: dict[str, int | None] = {}
    for field, key in (("vms", "vms"), ("cpu", "cpu"), ("memory", "memory_mb"), ("disk", "disk_gb")):
        text = form.get(field, "").strip()
        if text and not text.isdigit():
            raise UsageError(f"{field} must be a whole number")
        values[key] = int(text) if text else None
    changed = await _admin(request).set_quota(actor, request.path_params["handle"], reset=bool(form.get("reset")),
                                              **values)
    return f"quota of {changed.handle} updated"


@action
async def suspend(request: Request, actor: Actor, form: dict[str, str]) -> str:
    changed = await _admin(request).suspend(actor, request.path_params["handle"], form.get("reason", ""))
    return f"{changed.handle} is suspended; their VMs are stopped"


@action
async def unsuspend(request: Request, actor: Actor, form: dict[str, str]) -> str:
    changed = await _admin(request).unsuspend(actor, request.path_params["handle"])
    return f"{changed.handle} is no longer suspended (their VMs stay stopped)"


@action
async def delete_user(request: Request, actor: Actor, form: dict[str, str]) -> str:
    handle = request.path_params["handle"]
    await _admin(request).delete_user(actor, handle, form.get("confirm", ""))
    return f"{handle} was deleted with their VMs"


@action
async def vm_power(request: Request, actor: Actor, form: dict[str, str]) -> str:
    op = request.path_params["op"]
    done = await _admin(request).vm_power(actor, request.path_params["name"], op)
    return f"{done.name}: {op} done ({done.status})"


@action
async def vm_remove(request: Request, actor: Actor, form: dict[str, str]) -> str:
    name = request.path_params["name"]
    await _admin(request).vm_remove(actor, name, form.get("confirm", ""))
    return f"{name} was removed"


@action
async def revoke_token(request: Request, actor: Actor, form: dict[str, str]) -> str:
    token_id = request.path_params["token_id"]
    done = await _admin(request).revoke_token(actor, token_id)
    return f"token {token_id} revoked" if done else f"token {token_id} was already revoked"


async def root(request: Request) -> Response:
    return RedirectResponse(f"{PREFIX}/", 308)


def routes() -> list[BaseRoute]:
    get, post = ["GET"], ["POST"]
    return [
        Route(PREFIX, root, methods=get),
        Route(f"{PREFIX}/", dashboard, methods=get),
        Route(f"{PREFIX}/users", users, methods=get),
        Route(f"{PREFIX}/users/{{handle}}", user, methods=get),
        Route(f"{PREFIX}/users/{{handle}}/trust", set_trust, methods=post),
        Route(f"{PREFIX}/users/{{handle}}/quota", set_quota, methods=post),
        Route(f"{PREFIX}/users/{{handle}}/suspend", suspend, methods=post),
        Route(f"{PREFIX}/users/{{handle}}/unsuspend", unsuspend, methods=post),
        Route(f"{PREFIX}/users/{{handle}}/delete", delete_user, methods=post),
        Route(f"{PREFIX}/vms", vms, methods=get),
        Route(f"{PREFIX}/vms/{{name}}", vm, methods=get),
        Route(f"{PREFIX}/vms/{{name}}/rm", vm_remove, methods=post),
        Route(f"{PREFIX}/vms/{{name}}/{{op:str}}", vm_power, methods=post),
        Route(f"{PREFIX}/shares", shares, methods=get),
        Route(f"{PREFIX}/tokens", tokens, methods=get),
        Route(f"{PREFIX}/tokens/{{token_id}}/revoke", revoke_token, methods=post),
        Route(f"{PREFIX}/llm", llm_usage, methods=get),
        Route(f"{PREFIX}/audit", audit, methods=get),
        Route(f"{PREFIX}/audit.csv", audit_csv, methods=get),
    ]


"""``GET /__ussycode/forward-auth?k=<secret>``: Caddy asks before proxying a VM URL that its own paths do not serve.

The original request arrives as ``X-Forwarded-{Host,Uri,Method,Proto}`` plus the client's Cookie/Authorization;
the answer is :func:`ussycode.api.forward_auth.decide` (2xx: Caddy goes on with the identity headers and dials
the upstream named in ``X-Ussy-Upstream``). The DB inputs of a decision are cached until any write; an allow
that depends only on the host and the credentials may be replayed by the lean listener (``api/gate.py``), and
a signed-in visitor's allow is also kept as a grant Caddy checks itself (:mod:`ussycode.proxy.grants`). Served
by the lean listener, and mounted on the app server too.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ussycode import telemetry
from ussycode.api.context import client_address, cookie_header, services_of, web_parts
from ussycode.api.forward_auth import (
    SHARE_COOKIE_PREFIX,
    SHARE_PARAM,
    Access,
    AuthRequest,
    BearerView,
    Identity,
    ShareLink,
    ShareView,
    VmView,
    decide,
)
from ussycode.api.hostnames import HostError, parse_target
from ussycode.api.pages import error_json, forwarder_failed_page, suspended_page, vm_state_page
from ussycode.config import TlsMode
from ussycode.errors import RateLimited, UssyError
from ussycode.proxy.front import UPSTREAM_HEADER
from ussycode.proxy.grants import GRANT_HEADER
from ussycode.proxy.grants import cookie_name as grant_cookie_name
from ussycode.services.container import Services
from ussycode.services.sessions import WebSession, cookie_name, session_row
from ussycode.services.shares import AccessRecord, access_record, link_token_hash
from ussycode.store.cache import GenerationCache

log = logging.getLogger(__name__)

LOGIN_PATH = "/__ussycode/login"


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
    settings, shares, sessions = web_parts(request)
    services = services_of(request)
    routes = services.routes
    if routes is None:
        return PlainTextResponse("not ready", 503)
    if not hmac.compare_digest(request.query_params.get("k", ""), routes.auth_key):
        return PlainTextResponse("forbidden", 403)
    areq = AuthRequest.from_headers(request.headers)
    try:
        target = parse_target(areq.host, settings.domain)
    except HostError:
        return Response(error_json(400, "bad_host", "bad host"), 400, media_type="application/json")
    session_secret = areq.cookies.get(cookie_name(settings))
    # Only the share links this request presents are read (cookies and the URL), by the hashes of their tokens.
    presented = tuple({link_token_hash(v) for k, v in areq.cookies.items() if k.startswith(SHARE_COOKIE_PREFIX)}
                      | {link_token_hash(v) for k, v in _query_pairs(areq.query) if k == SHARE_PARAM})

    def read(c: sa.Connection) -> tuple[AccessRecord | None, WebSession | None]:
        rec = access_record(c, vm_name=target.vm_name, cname=target.cname, link_hashes=presented)
        return rec, (session_row(c, session_secret, target.host, rec.vm_id) if rec is not None else None)

    cache = _access_cache(request)
    key = (target.host, session_secret, presented)
    generation = services.store.generation
    cached = cache.get(key, generation)
    if cached is None:
        cached = await services.store.read(read)
        cache.put(key, generation, cached, _session_deadline(cached[1]))
    record, session = cached

    if record is not None and record.owner_suspended:
        telemetry.FORWARD_AUTH.labels("suspended").inc()
        gone = suspended_page(record.name, accept=areq.accept, method=areq.method)
        return Response(gone.body, status_code=gone.status, media_type=gone.content_type,
                        headers={"Cache-Control": "no-store"})
    now = dt.datetime.now(dt.UTC)
    vm = shares_view = None
    if record is not None:
        vm, shares_view = access_views(record)
    identity = None if session is None else Identity(session.user_id, session.handle, session.email)
    try:
        bearer = await _bearer(services, areq.bearer_token, record.name, client_address(request)) if record else None
    except RateLimited as exc:
        return Response(error_json(429, "rate_limited", exc.user_message), 429, media_type="application/json",
                        headers={"Retry-After": str(int(exc.retry_after) + 1), "Cache-Control": "no-store"})
    decision = decide(areq, domain=settings.domain, vm=vm, shares=shares_view or ShareView(), session=identity,
                      bearer=bearer, now=now, login_url=settings.public_url(settings.domain) + LOGIN_PATH)
    telemetry.FORWARD_AUTH.labels(decision.outcome.value).inc()
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
                if decision.access is Access.PUBLIC:
                    routes.public_served(target.host)
            except (UssyError, OSError) as exc:
                log.warning("forwarder for %s:%d failed: %s", record.name, target.port, exc)
                page = forwarder_failed_page(record.name, accept=areq.accept, method=areq.method)
        if page is not None:
            return Response(page.body, status_code=page.status, media_type=page.content_type,
                            headers={"Cache-Control": "no-store", **dict(page.headers)})
    if decision.status >= 300:
        headers.update({"Cache-Control": "no-store"})
    response = Response(decision.body, status_code=decision.status, headers=headers, media_type=decision.content_type)
    if (decision.allowed and record is not None and UPSTREAM_HEADER in headers and "Set-Cookie" not in headers
            and SHARE_PARAM not in areq.query):
        # This answer depends only on the host and the credentials (cookies, Authorization): the lean listener
        # may replay it for the same ones until any DB write, the session's expiry or REPLAY_TTL.
        until = time.monotonic() + REPLAY_TTL
        deadline = _session_deadline(session)
        replay = Replay(generation, min(until, deadline) if deadline else until, record.vm_id, target.port)
        response.replay = replay  # type: ignore[attr-defined]
        if session is not None and areq.bearer_token is None and decision.access in _GRANTED:
            # ... and Caddy may let the same browser through itself until then (proxy.grants)
            name = grant_cookie_name(settings.tls is not TlsMode.OFF)
            value = await routes.grant(session, target.host, str(decision.access), record.vm_id, target.port,
                                 generation=generation, until=replay.until)
            if value is not None and areq.cookies.get(name) != value:  # the browser lacks it: Caddy passes it on
                response.headers[GRANT_HEADER] = cookie_header(settings, name, value, max(1, int(session.seconds_left)))
    return response


_GRANTED = (Access.OWNER, Access.SHARED, Access.PUBLIC)  # a signed-in visitor's own access


REPLAY_TTL = 2.0


@dataclass(frozen=True)
class Replay:
    """May an allow be replayed (api/gate.py): the store generation it was decided at, until when (monotonic),
    and the forwarder it names (a dead forwarder is never replayed)."""

    generation: int
    until: float
    vm_id: str
    port: int


def _session_deadline(session: WebSession | None) -> float | None:
    """The session's expiry on the monotonic clock (never serve a cached session past it)."""
    if session is None:
        return None
    return time.monotonic() + session.seconds_left


def _access_cache(request: Request) -> GenerationCache[tuple[AccessRecord | None, WebSession | None]]:
    cache: GenerationCache[tuple[AccessRecord | None, WebSession | None]] | None = getattr(
        request.app.state, "access_cache", None)
    if cache is None:
        cache = request.app.state.access_cache = GenerationCache(max_entries=8192, ttl=5.0)
    return cache


def access_views(record: AccessRecord) -> tuple[VmView, ShareView]:
    """What :func:`decide` needs, from the DB record."""
    vm = VmView(record.vm_id, record.name, record.owner_id, public=8080 in record.public_ports,
                public_ports=frozenset(p for p in record.public_ports if p != 8080), cnames=record.cnames)
    links = tuple(ShareLink(ln.token_hash, record.vm_id, ln.port,
                            None if ln.expires_at is None else ln.expires_at.replace(tzinfo=dt.UTC))
                  for ln in record.links)
    return vm, ShareView(record.user_ids, record.emails, links)


def _query_pairs(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)

"""What every browser-facing endpoint reads from a request: the services, the HTTPS entry's parts, and the
client's address as Caddy saw it."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from ussycode.config import Settings, TlsMode
from ussycode.proxy.hygiene import CLIENT_ADDR_HEADER, PROXY_KEY_HEADER
from ussycode.services.container import Services
from ussycode.services.sessions import SessionService
from ussycode.services.shares import ShareService


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def web_parts(request: Request) -> tuple[Settings, ShareService, SessionService]:
    s = services_of(request)
    if s.shares is None or s.sessions is None:
        raise RuntimeError("the HTTPS entry is not set up")
    return s.settings, s.shares, s.sessions


def cookie_header(settings: Settings, name: str, value: str, max_age: int) -> str:
    """A Set-Cookie value for one of our cookies: host-only, HttpOnly, SameSite=Lax, Secure unless --tls off."""
    cookie = f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax"
    if settings.tls is not TlsMode.OFF:
        cookie += "; Secure"
    return cookie


def client_address(request: Request) -> str:
    """The client's address: what Caddy saw when the request carries this start's proxy key (Caddy sets both
    headers and drops client-sent copies); the TCP peer otherwise, whatever X-Forwarded-For says."""
    return client_address_from(services_of(request), request.client.host if request.client else "",
                               request.headers.get(PROXY_KEY_HEADER, ""), request.headers.get(CLIENT_ADDR_HEADER, ""))


def client_address_from(services: Services, peer: str, proxy_key: str, forwarded: str) -> str:
    """:func:`client_address` from the parts already read: the TCP peer, and the request's proxy key and
    client-address headers ("" when absent)."""
    routes = services.routes
    if routes is not None and proxy_key and hmac.compare_digest(proxy_key.encode(), routes.proxy_key.encode()):
        return forwarded[:64] or peer
    return peer

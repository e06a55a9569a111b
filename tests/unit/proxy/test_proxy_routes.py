"""Pure Route -> Caddy JSON builders (their acceptance by a real Caddy is in tests/integration/test_caddy_config.py)."""

from __future__ import annotations

import json

import pytest

from ussycode.proxy.routes import (
    CATCHALL_ID,
    IDENTITY_HEADERS,
    Route,
    RouteKind,
    ServerSettings,
    TlsMode,
    auth_target,
    build_config,
    build_route,
)

AUTH = "http://127.0.0.1:8080/__ussy/auth"
APP = "127.0.0.1:8080"


def private() -> Route:
    return Route(RouteKind.VM, "web.ussy.test", "unix//run/u/bridges/vm1-8080.sock", auth_url=AUTH, app=APP,
                 proxy_key="k3y")


def test_private_route_strips_then_authenticates_then_proxies() -> None:
    r = build_route(private())
    assert r["@id"] == "ussycode-vm-web.ussy.test"
    assert r["match"] == [{"host": ["web.ussy.test"]}] and r["terminal"] is True
    strip, ours, auth, creds, proxy = r["handle"]
    assert strip == {"handler": "headers", "request": {"delete": ["X-Ussy-*", "*_*"]}}
    (ours_path,) = ours["routes"]
    assert ours_path["match"] == [{"path": ["/__ussycode", "/__ussycode/*"]}]
    assert ours_path["handle"][0]["upstreams"] == [{"dial": APP}]
    assert ours_path["handle"][0]["headers"]["request"]["set"]["X-Ussy-Proxy-Key"] == ["k3y"]
    assert creds["handler"] == "subroute"
    assert auth["headers"]["request"]["set"]["X-Ussy-Client-Addr"] == ["{http.request.remote.host}"]
    assert auth["handler"] == "reverse_proxy" and auth["upstreams"] == [{"dial": "127.0.0.1:8080"}]
    assert auth["rewrite"] == {"method": "GET", "uri": "/__ussy/auth"}
    sent = auth["headers"]["request"]["set"]
    assert sent["X-Forwarded-Uri"] == ["{http.request.uri}"] and sent["X-Forwarded-Method"] == ["{http.request.method}"]
    (good,) = auth["handle_response"]
    assert good["match"] == {"status_code": [2]}
    copied = [route["handle"][0]["request"] for route in good["routes"]]
    # client-sent copies were dropped by the first handler (strip); only forward-auth's non-empty values are set
    assert copied == [{"set": {name: ["{http.reverse_proxy.header." + name + "}"]}} for name in IDENTITY_HEADERS]
    assert all(route["match"] for route in good["routes"])
    # Caddy sets X-Forwarded-* itself and streams without a forced flush (both proven through a real Caddy)
    assert proxy == {"handler": "reverse_proxy", "upstreams": [{"dial": "unix//run/u/bridges/vm1-8080.sock"}]}


def test_public_route_skips_auth_but_still_strips() -> None:
    r = build_route(Route(RouteKind.PORT, "3000-web.ussy.test", "unix//s.sock", public=True, app=APP))
    assert [h["handler"] for h in r["handle"]] == ["headers", "subroute", "subroute", "reverse_proxy"]
    assert r["handle"][2] == build_route(private())["handle"][3]  # the same credential stripping
    assert r["@id"] == "ussycode-port-3000-web.ussy.test"


def test_vm_routes_need_the_app_address() -> None:
    with pytest.raises(ValueError):
        Route(RouteKind.VM, "web.ussy.test", "unix//s.sock", public=True)


@pytest.mark.parametrize("host", ["Web.ussy.test", "web.ussy.test.", "web_x.ussy.test", "", "a" * 64 + ".t", "-a.t"])
def test_bad_hosts_rejected(host: str) -> None:
    with pytest.raises(ValueError):
        Route(RouteKind.VM, host, "unix//s.sock", public=True, app=APP)


@pytest.mark.parametrize("url", ["", "https://127.0.0.1/x", "http://127.0.0.1", "ftp://x/y", "/path"])
def test_private_route_needs_a_usable_auth_url(url: str) -> None:
    with pytest.raises(ValueError):
        Route(RouteKind.VM, "web.ussy.test", "unix//s.sock", auth_url=url, app=APP)


def test_auth_target() -> None:
    assert auth_target("http://127.0.0.1:8080/a?b=1") == ("127.0.0.1:8080", "/a?b=1")
    assert auth_target("http://auth.internal/a") == ("auth.internal:80", "/a")


def test_config_off_internal_acme() -> None:
    base = {"domain": "ussy.test", "https_addr": ":8443", "admin_listen": "unix//d/admin.sock"}
    off = build_config(ServerSettings(**base, tls=TlsMode.OFF), [private()])  # type: ignore[arg-type]
    srv = off["apps"]["http"]["servers"]["ussycode"]
    assert srv["listen"] == [":8443"] and srv["automatic_https"] == {"disable": True}
    ids = [r["@id"] for r in srv["routes"]]
    assert ids == ["ussycode-apex-ussy.test", "ussycode-vm-web.ussy.test", CATCHALL_ID]
    assert "tls" not in off["apps"] and off["admin"]["listen"] == "unix//d/admin.sock"
    assert srv["routes"][0]["handle"][-1]["upstreams"] == [{"dial": "127.0.0.1:8080"}]

    internal = build_config(ServerSettings(**base, tls=TlsMode.INTERNAL, ask_url="http://127.0.0.1:8080/ask"))  # type: ignore[arg-type]
    pols = internal["apps"]["tls"]["automation"]["policies"]
    # a two-label domain: a wildcard clients accept (port URLs, unknown hosts); custom domains on demand
    assert pols[0] == {"subjects": ["*.ussy.test", "ussy.test"], "issuers": [{"module": "internal"}]}
    assert pols[1] == {"issuers": [{"module": "internal"}], "on_demand": True}
    assert internal["apps"]["tls"]["automation"]["on_demand"] == {"permission": {"module": "http", "endpoint": "http://127.0.0.1:8080/ask"}}
    assert internal["apps"]["pki"]["certificate_authorities"]["local"]["install_trust"] is False
    assert internal["apps"]["http"]["servers"]["ussycode"]["tls_connection_policies"] == [{}]

    acme = build_config(ServerSettings(**base, tls=TlsMode.ACME, acme_email="ops@ussy.test"))  # type: ignore[arg-type]
    (pol,) = acme["apps"]["tls"]["automation"]["policies"]
    assert pol["issuers"] == [{"module": "acme", "email": "ops@ussy.test"}] and "*.ussy.test" not in pol["subjects"]
    with pytest.raises(ValueError):
        ServerSettings(domain="ussy.test", tls=TlsMode.ACME)
    json.dumps(acme)  # JSON-serialisable

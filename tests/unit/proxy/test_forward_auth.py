"""The forward-auth decision matrix: host forms, public/private, sessions, share links, Bearer tokens."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from ussycode.api.forward_auth import (
    Access,
    AuthRequest,
    BearerView,
    Identity,
    Outcome,
    ShareLink,
    ShareView,
    VmView,
    decide,
    parse_cookies,
    share_cookie_name,
)
from ussycode.api.hostnames import HostError, normalize_host, parse_target, tls_ask
from ussycode.auth.links import link_token_hash

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DOMAIN = "ussy.test"
LOGIN = "https://ussy.test/__ussy/login"
OWNER = Identity("u-owner", "alice", "alice@example.com")
FRIEND = Identity("u-friend", "bob", "bob@example.com")
EMAIL_FRIEND = Identity("u-mail", "carol", "Carol@Example.com")
STRANGER = Identity("u-other", "mallory", None)
TOKEN = "tok_valid_123456"
EXPIRED = "tok_expired_12345"
OTHERS = "tok_othervm_12345"
REMOVED = "tok_removed_12345"


def vm(public: bool = False, ports: frozenset[int] = frozenset(), cnames: frozenset[str] = frozenset()) -> VmView:
    return VmView("vm1", "web-app", OWNER.user_id, public=public, public_ports=ports, cnames=cnames)


SHARES = ShareView(
    user_ids=frozenset({FRIEND.user_id}),
    emails=frozenset({"carol@example.com"}),
    links=(
        ShareLink(link_token_hash(TOKEN), "vm1", 8080, NOW + timedelta(hours=2)),
        ShareLink(link_token_hash(EXPIRED), "vm1", 8080, NOW - timedelta(seconds=1)),
        ShareLink(link_token_hash(OTHERS), "vm2", 8080, None),  # defensive: a link of another VM handed in by mistake
    ),
)


def req(
    host: str = "web-app.ussy.test",
    uri: str = "/",
    *,
    method: str = "GET",
    cookies: dict[str, str] | None = None,
    bearer: str | None = None,
    html: bool = True,
    scheme: str = "https",
) -> AuthRequest:
    return AuthRequest(
        host=host,
        uri=uri,
        method=method,
        scheme=scheme,
        cookies=cookies or {},
        authorization=f"Bearer {bearer}" if bearer is not None else "",
        accept="text/html,application/xhtml+xml,*/*;q=0.8" if html else "application/json",
    )


def run(
    request: AuthRequest,
    *,
    v: VmView | None = None,
    session: Identity | None = None,
    bearer: BearerView | None = None,
    shares: ShareView = SHARES,
    **kw: object,
):
    return decide(
        request,
        domain=DOMAIN,
        vm=v if v is not None else vm(**kw),  # type: ignore[arg-type]
        shares=shares,
        session=session,
        bearer=bearer,
        now=NOW,
        login_url=LOGIN,
    )


def headers(d) -> dict[str, str]:
    return dict(d.headers)


# --- host normalisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("web-app.ussy.test", "web-app.ussy.test"),
        ("WEB-APP.Ussy.Test", "web-app.ussy.test"),
        ("web-app.ussy.test.", "web-app.ussy.test"),
        ("web-app.ussy.test:8443", "web-app.ussy.test"),
        ("web-app.ussy.test.:8443", "web-app.ussy.test"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ":8443",
        "a" * 254,
        ("a" * 63 + ".") * 4 + "ussy.test",
        "web app.ussy.test",
        "web_app.ussy.test",
        "web-app.ussy.test:99999",
        "web-app.ussy.test:x",
        "[::1]:8443",
        "::1",
        "-bad.ussy.test",
        "bad-.ussy.test",
        "a..ussy.test",
        "web-app.ussy.test\r\nX-Evil: 1",
        "web-app.ussy.test/path",
        "user@web-app.ussy.test",
        "a" * 64 + ".ussy.test",
        "\u2603" * 300,
    ],
)
def test_hostile_hosts_are_bad_requests(raw: str) -> None:
    with pytest.raises(HostError):
        normalize_host(raw)
    d = run(req(host=raw))
    assert d.outcome is Outcome.BAD_REQUEST and d.status == 400
    assert json.loads(d.body)["code"] == 400


@pytest.mark.parametrize(
    ("raw", "name", "port"),
    [
        ("web-app.ussy.test", "web-app", 8080),
        ("3000-web-app.ussy.test", "web-app", 3000),
        ("9999-web-app.ussy.test", "web-app", 9999),
        ("8080-web-app.ussy.test:8443", "web-app", 8080),
    ],
)
def test_parse_target_vm_forms(raw: str, name: str, port: int) -> None:
    t = parse_target(raw, DOMAIN)
    assert (t.vm_name, t.port, t.cname, t.apex) == (name, port, None, False)


@pytest.mark.parametrize(
    "raw",
    [
        "2999-web-app.ussy.test",
        "10000-web-app.ussy.test",
        "0080-web-app.ussy.test",
        "80-web-app.ussy.test",
        "a.web-app.ussy.test",
        "x.ussy.test",
        "1web.ussy.test",
        "3000-x.ussy.test",
        "3000-3000-web-app.ussy.test",
    ],
)
def test_names_that_are_never_vms_are_404(raw: str) -> None:
    t = parse_target(raw, DOMAIN)
    assert t.vm_name is None and t.cname is None
    assert run(req(host=raw)).status == 404


def test_apex_and_foreign_hosts() -> None:
    assert parse_target("USSY.test.", DOMAIN).apex
    assert parse_target("shop.example.com", DOMAIN).cname == "shop.example.com"
    assert run(req(host="ussy.test")).status == 404
    # A host naming another VM than the one looked up (caller bug, or a rename race) is never served.
    assert run(req(host="other-vm.ussy.test"), session=OWNER).status == 404
    assert (
        decide(
            req(), domain=DOMAIN, vm=None, shares=SHARES, session=OWNER, bearer=None, now=NOW, login_url=LOGIN
        ).status
        == 404
    )


def test_idn_host_that_matches_no_vm_is_404() -> None:
    # "wéb-app" punycodes to xn--wb-app-..., which is not the VM name "web-app".
    assert run(req(host="wéb-app.ussy.test"), session=OWNER).status == 404
    assert run(req(host="xn--wb-app-bva.ussy.test"), session=OWNER).status == 404


def test_cnames() -> None:
    v = vm(cnames=frozenset({"shop.example.com"}))
    assert run(req(host="Shop.Example.com."), v=v, session=OWNER).outcome is Outcome.ALLOW
    assert run(req(host="evil.example.com"), v=v, session=OWNER).status == 404
    # a cname always means port 8080, and follows the VM's access rules
    d = run(req(host="shop.example.com"), v=v)
    assert d.status == 302 and headers(d)["Location"].startswith(LOGIN)


# --- the access matrix -------------------------------------------------------------------------------------

SESSIONS = {"owner": OWNER, "shared": FRIEND, "shared_email": EMAIL_FRIEND, "other": STRANGER, "none": None}


@pytest.mark.parametrize("who", list(SESSIONS))
@pytest.mark.parametrize("public", [True, False])
def test_public_private_by_session(who: str, public: bool) -> None:
    d = run(req(), session=SESSIONS[who], public=public)
    if public:
        assert d.outcome is Outcome.ALLOW and d.access is Access.PUBLIC
        # public: a signed-in visitor is named (whoever they are), an anonymous one is not
        session = SESSIONS[who]
        expected: dict[str, str] = {}  # anonymous: nothing, as on the file fast path
        if session is not None:
            expected |= {"X-Ussy-Access": "public", "X-Ussy-User-Id": session.user_id, "X-Ussy-Handle": session.handle}
            if session.email:
                expected["X-Ussy-Email"] = session.email
        assert headers(d) == expected
    elif who == "owner":
        assert d.access is Access.OWNER
        assert headers(d) == {
            "X-Ussy-Access": "owner",
            "X-Ussy-User-Id": "u-owner",
            "X-Ussy-Handle": "alice",
            "X-Ussy-Email": "alice@example.com",
        }
    elif who in ("shared", "shared_email"):
        assert d.access is Access.SHARED and headers(d)["X-Ussy-Handle"] == SESSIONS[who].handle  # type: ignore[union-attr]
    elif who == "other":
        assert d.status == 403 and "not shared with you" in d.body
    else:
        assert d.status == 302
        loc = urlsplit(headers(d)["Location"])
        assert f"{loc.scheme}://{loc.netloc}{loc.path}" == LOGIN
        assert parse_qs(loc.query)["next"] == ["https://web-app.ussy.test/"]


def test_missing_email_is_not_sent_as_empty_header() -> None:
    d = run(req(), session=STRANGER, v=VmView("vm1", "web-app", STRANGER.user_id))
    assert "X-Ussy-Email" not in headers(d)


def test_header_values_with_control_characters_are_dropped() -> None:
    evil = Identity("u-owner", "alice\r\nX-Ussy-Access: owner", "a@b.c")
    d = run(req(), session=evil)
    assert "X-Ussy-Handle" not in headers(d) and headers(d)["X-Ussy-User-Id"] == "u-owner"


def test_login_redirect_keeps_port_and_query() -> None:
    d = run(req(host="3000-web-app.ussy.test:8443", uri="/a/b?x=1&y=%20"))
    assert parse_qs(urlsplit(headers(d)["Location"]).query)["next"] == [
        "https://3000-web-app.ussy.test:8443/a/b?x=1&y=+"
    ]


def test_non_browser_without_credentials_gets_401_json() -> None:
    d = run(req(html=False))
    assert d.status == 401 and d.content_type == "application/json"
    body = json.loads(d.body)
    assert body["code"] == 401 and body["login"].startswith(LOGIN)
    assert run(req(method="POST"), session=None).status == 401


@pytest.mark.parametrize(
    ("port", "public_ports", "allowed"), [(3000, {3000}, True), (3001, {3000}, False), (8080, {3000}, False)]
)
def test_public_ports(port: int, public_ports: set[int], allowed: bool) -> None:
    host = f"{port}-web-app.ussy.test"
    d = run(req(host=host), ports=frozenset(public_ports))
    assert (d.access is Access.PUBLIC) is allowed


def test_public_vm_does_not_make_other_ports_public() -> None:
    assert run(req(host="3000-web-app.ussy.test"), public=True).status == 302


# --- share links -----------------------------------------------------------------------------------------------

LINKS = {"valid": TOKEN, "expired": EXPIRED, "other_vm": OTHERS, "removed": REMOVED, "garbage": "x"}


@pytest.mark.parametrize("who", list(SESSIONS))
@pytest.mark.parametrize("link", list(LINKS))
def test_share_link_in_url(link: str, who: str) -> None:
    session = SESSIONS[who]
    d = run(req(uri=f"/page?a=1&ussy_share={LINKS[link]}&b=2"), session=session)
    if link == "valid":
        assert d.status == 302 and d.reason == "share_link_set"
        h = headers(d)
        assert h["Location"] == "https://web-app.ussy.test/page?a=1&b=2"
        cookie = h["Set-Cookie"]
        assert cookie.startswith(f"{share_cookie_name('vm1')}={TOKEN};")
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        assert "Max-Age=7200" in cookie  # capped at the link's expiry
    elif who in ("owner", "shared", "shared_email"):
        # allowed anyway: the dead link is only stripped so the app never sees it
        assert d.status == 302 and d.reason == "share_link_invalid_stripped"
        assert headers(d) == {"Location": "https://web-app.ussy.test/page?a=1&b=2"}
    else:
        assert d.status == 403 and d.reason == "share_link_invalid"
        assert "Set-Cookie" not in headers(d)


@pytest.mark.parametrize("who", list(SESSIONS))
@pytest.mark.parametrize("link", list(LINKS))
def test_share_link_cookie(link: str, who: str) -> None:
    session = SESSIONS[who]
    d = run(req(cookies={share_cookie_name("vm1"): LINKS[link]}), session=session)
    if who in ("owner", "shared", "shared_email"):
        assert d.outcome is Outcome.ALLOW and d.access is not Access.SHARE_LINK
    elif link == "valid":
        assert d.outcome is Outcome.ALLOW and d.access is Access.SHARE_LINK
        if session is None:
            assert headers(d) == {"X-Ussy-Access": "share-link"}
        else:
            assert headers(d)["X-Ussy-Handle"] == session.handle
    elif who == "other":
        assert d.status == 403
    else:
        assert d.status == 302 and headers(d)["Location"].startswith(LOGIN)


def test_removed_link_revokes_cookie_access_at_once() -> None:
    cookies = {share_cookie_name("vm1"): TOKEN}
    assert run(req(cookies=cookies)).access is Access.SHARE_LINK
    assert run(req(cookies=cookies), shares=ShareView()).status == 302


def test_cookie_for_another_vm_does_not_open_this_one() -> None:
    assert run(req(cookies={share_cookie_name("vm2"): OTHERS})).status == 302
    assert run(req(cookies={share_cookie_name("vm1"): OTHERS})).status == 302


def test_share_link_never_expiring_gets_a_day_and_http_has_no_secure() -> None:
    shares = ShareView(links=(ShareLink(link_token_hash(TOKEN), "vm1", 8080, None),))
    d = run(req(uri=f"/?ussy_share={TOKEN}", scheme="http"), shares=shares)
    cookie = headers(d)["Set-Cookie"]
    assert "Max-Age=86400" in cookie and "Secure" not in cookie
    assert headers(d)["Location"] == "http://web-app.ussy.test/"


def test_share_link_on_post_is_a_one_request_credential() -> None:
    d = run(req(method="POST", uri=f"/api?ussy_share={TOKEN}", html=False))
    assert d.outcome is Outcome.ALLOW and d.access is Access.SHARE_LINK


def test_repeated_share_params_all_must_be_valid() -> None:
    d = run(req(uri=f"/?ussy_share={TOKEN}&ussy_share={REMOVED}"))
    assert d.status == 403


def test_share_link_on_public_vm_plays_no_part() -> None:
    # public: allowed as is, no cookie, no redirect (Caddy strips ussy_share before the app, as on the fast path)
    for token in (EXPIRED, "bogus-token-1234"):
        d = run(req(uri=f"/?ussy_share={token}"), public=True)
        assert d.allowed and d.access is Access.PUBLIC and "Set-Cookie" not in headers(d)


# --- bearer tokens --------------------------------------------------------------------------------------------

BEARERS = {
    "owner": BearerView(True, OWNER),
    "shared": BearerView(True, FRIEND),
    "other": BearerView(True, STRANGER),
    "scoped_here": BearerView(True, OWNER, vm_id="vm1"),
    "scoped_elsewhere": BearerView(True, OWNER, vm_id="vm2"),
    "bad": BearerView(False),
    "unchecked": None,  # the header is there but the caller passed no verification: fail closed
}


@pytest.mark.parametrize("session", ["owner", "none"])
@pytest.mark.parametrize("kind", list(BEARERS))
def test_bearer(kind: str, session: str) -> None:
    d = run(req(bearer="usy1.something", html=True), bearer=BEARERS[kind], session=SESSIONS[session])
    if kind in ("owner", "shared", "scoped_here"):
        assert d.outcome is Outcome.ALLOW and d.access is Access.BEARER
    elif kind in ("bad", "unchecked"):
        assert d.status == 401 and d.content_type == "application/json"
        assert json.loads(d.body) == {"error": "invalid or expired token", "code": 401, "reason": "bearer_invalid"}
    else:
        assert d.status == 403 and d.content_type == "application/json"


def test_bearer_does_not_bypass_public_and_empty_bearer_is_not_ours() -> None:
    assert run(req(bearer="usy1.x"), bearer=BearerView(False), public=True).access is Access.PUBLIC
    assert run(req(bearer="", html=False), bearer=None).status == 401  # nobody: 401 JSON


@pytest.mark.parametrize("value", ["app-own-token", "", "eyJhbGciOi.x.y", "usy2.x", "xusy1.y"])
def test_a_bearer_that_is_not_ours_is_the_apps(value: str) -> None:
    """Not a platform token: ignored by the decision (the session decides) and left for the app."""
    r = req(bearer=value, html=True)
    assert r.bearer_token is None
    assert run(r, session=SESSIONS["owner"]).access is Access.OWNER
    assert run(r).status == 302  # no session: sign in, not "invalid token"


def test_basic_auth_is_not_a_bearer() -> None:
    r = AuthRequest(host="web-app.ussy.test", authorization="Basic Zm9vOmJhcg==", accept="text/html")
    assert r.bearer_token is None
    assert run(r).status == 302


def test_bad_bearer_with_bad_share_link_stays_401() -> None:
    d = run(req(uri=f"/?ussy_share={REMOVED}", bearer="usy1.x"), bearer=BearerView(False))
    assert d.status == 401


# --- parsing Caddy's forward-auth request ---------------------------------------------------------------------


def test_from_headers() -> None:
    r = AuthRequest.from_headers(
        {
            "Host": "127.0.0.1:8080",
            "X-Forwarded-Host": "web-app.ussy.test:8443",
            "X-Forwarded-Uri": "/x?ussy_share=abc",
            "X-Forwarded-Method": "post",
            "X-Forwarded-Proto": "HTTP",
            "Cookie": 'a=1; bad; ussy_share_vm1="tok"; a=2',
            "Authorization": "Bearer  usy1.t0k ",
            "Accept": "text/html",
        }
    )
    assert (r.host, r.path, r.query, r.method, r.scheme) == (
        "web-app.ussy.test:8443",
        "/x",
        "ussy_share=abc",
        "POST",
        "http",
    )
    assert r.cookies == {"a": "1", "ussy_share_vm1": "tok"}
    assert r.bearer_token == "usy1.t0k"
    assert AuthRequest.from_headers({"host": "h", "x-forwarded-proto": "gopher"}).scheme == "https"


def test_parse_cookies_is_forgiving() -> None:
    assert parse_cookies("") == {}
    assert parse_cookies("x=1;;=2; y = 3 ; z") == {"x": "1", "y": "3"}


# --- on-demand TLS ask ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("ussy.test", True),
        ("web-app.ussy.test", True),
        ("3000-web-app.ussy.test", True),
        ("nope.ussy.test", False),
        ("shop.example.com", True),
        ("evil.example.com", False),
        ("a.web-app.ussy.test", False),
        ("bad host", False),
    ],
)
def test_tls_ask(host: str, ok: bool) -> None:
    assert tls_ask(host, DOMAIN, frozenset({"web-app"}), frozenset({"shop.example.com"})) is ok

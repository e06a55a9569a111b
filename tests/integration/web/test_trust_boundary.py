"""The trust boundary at the front door, as a user meets it: a real server with its managed Caddy on
``--tls internal`` (HTTPS with Caddy's local CA, HTTP/2), the real ``curl`` client with a cookie jar, and a real
VM whose app answers every request with what it received (headers, path, body).

Bob's VM app is hostile: whatever alice's requests carry of ours (her API token, her session cookie, a share
link's token) it would log and replay. None of it may arrive.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from ussycode.store import audit

from .conftest import Web, browser_client, free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

HTML = "Accept: text/html,application/xhtml+xml"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str

    def seen(self) -> dict[str, Any]:
        """What the VM app received (only when the app answered)."""
        assert self.status == 200 and self.body.startswith("{"), (self.status, self.body[:300])
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Curl:
    """The real curl with HTTPS against Caddy's local CA and one cookie jar (a browser profile)."""

    web: Web
    ca: Path
    jar: Path
    version: str = "--http2"
    extra_cookies: list[str] = field(default_factory=list)

    async def __call__(self, url: str, *args: str, data: str | None = None, method: str = "") -> Reply:
        host = urlsplit(url).hostname
        head = self.jar.with_suffix(".head")
        argv = ["curl", "-sS", self.version, "--cacert", str(self.ca), "--resolve", f"{host}:{self.web.port}:127.0.0.1",
                "-b", str(self.jar), "-c", str(self.jar), "-D", str(head), "-o", "-", "--max-time", "20"]
        for cookie in self.extra_cookies:
            argv += ["-b", cookie]
        if method:
            argv += ["-X", method]
        if data is not None:
            argv += ["--data-binary", data]
        proc = await asyncio.create_subprocess_exec(*argv, *args, url, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        lines = head.read_text().splitlines()
        status_lines = [n for n, line in enumerate(lines) if line.startswith("HTTP/")]
        last = lines[status_lines[-1]:]
        status = int(last[0].split()[1])
        headers = {}
        for line in last[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return Reply(status, headers, out.decode(errors="replace"))

    def cookie(self, name: str) -> str:
        """A cookie's value in the jar (Netscape format; HttpOnly ones carry a #HttpOnly_ prefix)."""
        for line in self.jar.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 7 and parts[5] == name:
                return parts[6]
        raise AssertionError(f"no cookie {name} in the jar")


@pytest.fixture
async def tls_web(web_factory: Callable[..., Any], needs_vms: None) -> Web:
    w: Web = await web_factory(port=free_port(), tls="internal")
    return w


def ca_of(web: Web) -> Path:
    caddy = web.server.app.https.caddy
    path: Path = caddy.root_ca_path
    return path


async def wait_ca(web: Web) -> Path:
    ca = ca_of(web)
    for _ in range(100):
        if ca.exists():
            return ca
        await asyncio.sleep(0.1)
    raise AssertionError("Caddy's local CA was not created")


def browser(web: Web, ca: Path, tmp_path: Path, name: str, **kw: Any) -> Curl:
    return Curl(web, ca, tmp_path / f"{name}.jar", **kw)


def u(web: Web, host: str, path: str = "/") -> str:
    return f"https://{host}:{web.port}{path}"


async def sign_in(web: Web, c: Curl, key: Path, host: str) -> None:
    """VM URL -> login page -> `browser` link -> apex session -> hand-off -> cookie for the VM host."""
    r = await c(u(web, host, "/page"), "-H", HTML)
    assert r.status == 302, (r.status, r.body[:300])
    r = await c(r.headers["location"], "-H", HTML)
    assert r.status == 200
    link = await web.login_url(key)
    r = await c(link, "-H", HTML)
    assert r.status == 303 and "/__ussycode/auth?code=" in r.headers["location"], (r.status, r.headers)
    r = await c(r.headers["location"], "-H", HTML)
    assert r.status == 302, (r.status, r.body[:300])


def assert_clean(seen: dict[str, Any], *secrets: str) -> None:
    """Nothing of ours in what the app received: no secret anywhere, no cookie of ours, no share parameter."""
    dump = json.dumps(seen)
    for secret in secrets:
        assert secret not in dump, f"a credential reached the app: {secret[:12]}…"
    assert "ussy_share" not in seen["path"]
    cookies = seen["headers"].get("cookie", "")
    assert not re.search(r"(^|[;\s])(__Host-)?ussy_", cookies), cookies
    assert not re.search(r"(?i)usy[01]\.", seen["headers"].get("authorization", ""))


async def test_no_credential_of_ours_reaches_a_vm_app(tls_web: Web, tmp_path: Path) -> None:
    web = tls_web
    ca = await wait_ca(web)
    bob = await web.server.register("bob")
    alice = await web.server.register("alice")
    await web.new_vm(bob, "web", ports=(8080, 3000))
    assert (await web.cmd(bob, "share", "add", "web", "alice")).exit_status == 0
    r = await web.cmd(alice, "token", "create", "--json")
    assert r.exit_status == 0, r
    token = json.loads(r.stdout)["token"]

    for version in ("--http2", "--http1.1"):
        # 1. alice's API token, on the main URL and a port URL
        c = browser(web, ca, tmp_path, f"token{version}", version=version)
        for host in ("web.localhost", "3000-web.localhost"):
            seen = (await c(u(web, host, "/t?q=1"), "-H", f"Authorization: Bearer {token}")).seen()
            assert seen["headers"]["x-ussy-handle"] == "alice" and seen["headers"]["x-ussy-access"] == "bearer"
            assert "authorization" not in seen["headers"]
            assert_clean(seen, token)

    # 2. alice's browser session (with a cookie of the app's own, which stays)
    s = browser(web, ca, tmp_path, "session", extra_cookies=["theme=dark"])
    await sign_in(web, s, alice, "web.localhost")
    session = s.cookie("__Host-ussy_session")
    seen = (await s(u(web, "web.localhost", "/page"), "-H", HTML)).seen()
    assert seen["headers"]["x-ussy-handle"] == "alice" and seen["headers"]["x-ussy-access"] == "shared"
    assert "theme=dark" in seen["headers"]["cookie"]
    assert_clean(seen, session, token)
    # the app's own Basic and Bearer auth reach it unchanged
    basic = "Basic " + base64.b64encode(b"user:pass").decode()
    seen = (await s(u(web, "web.localhost", "/"), "-H", f"Authorization: {basic}")).seen()
    assert seen["headers"]["authorization"] == basic
    seen = (await s(u(web, "web.localhost", "/"), "-H", "Authorization: Bearer app-own-token")).seen()
    assert seen["headers"]["authorization"] == "Bearer app-own-token"
    assert seen["headers"]["x-ussy-handle"] == "alice"  # the session decided

    # 3. a share link in a fresh browser: the link, then the cookie it set; a POST with the link in the URL
    r = await web.cmd(bob, "share", "add-link", "web", "--json")
    link = json.loads(r.stdout)
    link_token = link["url"].split("ussy_share=")[1]
    lk = browser(web, ca, tmp_path, "link")
    r = await lk(link["url"], "-H", HTML)
    assert r.status == 302 and "ussy_share" not in r.headers["location"]
    seen = (await lk(u(web, "web.localhost", "/x?a=1"), "-H", HTML)).seen()
    assert seen["headers"]["x-ussy-access"] == "share-link" and seen["path"] == "/x?a=1"
    assert_clean(seen, link_token)
    anon = browser(web, ca, tmp_path, "anon-post")
    seen = (await anon(u(web, "web.localhost", f"/submit?a=1&ussy_share={link_token}&b=2"), data="x=1")).seen()
    assert seen["method"] == "POST" and seen["body"] == "x=1" and seen["path"] == "/submit?a=1&b=2"
    assert_clean(seen, link_token)

    # 4. the same VM made public: no forward-auth, and still nothing of ours gets through
    assert (await web.cmd(bob, "share", "set-public", "web")).exit_status == 0
    everything = browser(web, ca, tmp_path, "link")  # the jar that holds the share-link cookie
    everything.extra_cookies = [f"__Host-ussy_session={session}; theme=light"]
    seen = (await everything(u(web, "web.localhost", f"/p?ussy_share={link_token}&z=9"),
                             "-H", f"Authorization: Bearer {token}")).seen()
    assert seen["headers"].get("x-ussy-access") in (None, "public") and seen["path"] == "/p?z=9"
    assert "theme=light" in seen["headers"]["cookie"]
    assert_clean(seen, token, session, link_token)


async def test_identity_headers_cannot_be_forged_in_any_spelling(tls_web: Web, tmp_path: Path) -> None:
    web = tls_web
    ca = await wait_ca(web)
    bob = await web.server.register("bob")
    await web.new_vm(bob, "web", ports=(8080, 3000))
    forged = ["X-Ussy-Handle: mallory", "X-Ussy_Handle: mallory", "x_ussy_access: owner", "X_USSY_USER_ID: u-mal",
              "X-USSY-ACCESS: owner", "x-ussy-email: m@evil.test", "X-Ussy-Client-Addr: 6.6.6.6",
              "X-Ussy-Proxy-Key: guess", "Some_Header: x"]
    args = [a for h in forged for a in ("-H", h)]
    # a signed-in owner on the private URL: the real identity, none of the forged ones
    s = browser(web, ca, tmp_path, "owner")
    await sign_in(web, s, bob, "web.localhost")
    seen = (await s(u(web, "web.localhost"), *args)).seen()
    assert seen["headers"]["x-ussy-handle"] == "bob" and seen["headers"]["x-ussy-access"] == "owner"
    dump = json.dumps(seen)
    for bad in ("mallory", "u-mal", "evil.test", "6.6.6.6", "guess", "some_header"):
        assert bad not in dump.lower(), bad
    assert not [k for k in seen["headers"] if "_" in k]
    # anonymous on a public URL and a public port URL
    assert (await web.cmd(bob, "share", "set-public", "web")).exit_status == 0
    assert (await web.cmd(bob, "share", "set-public", "web", "--port=3000")).exit_status == 0
    anon = browser(web, ca, tmp_path, "anon")
    for host in ("web.localhost", "3000-web.localhost"):
        seen = (await anon(u(web, host), *args)).seen()
        assert not [k for k in seen["headers"] if k.startswith("x-ussy") or "_" in k], seen["headers"]


async def test_handoff_is_ours_and_sessions_are_bound_to_the_vm(tls_web: Web, tmp_path: Path) -> None:
    web = tls_web
    ca = await wait_ca(web)
    bob = await web.server.register("bob")
    alice = await web.server.register("alice")
    carol = await web.server.register("carol")
    await web.new_vm(bob, "web")
    assert (await web.cmd(bob, "share", "set-public", "web")).exit_status == 0

    # /__ussycode/* on a public VM host is answered by ussycode, in any case, never by the app
    a = browser(web, ca, tmp_path, "alice")
    for path in ("/__ussycode/auth?code=x.y", "/__USSYCODE/auth?code=x.y", "/__ussycode", "/__ussycode/anything"):
        r = await a(u(web, "web.localhost", path))
        assert not r.body.startswith("{\"path\""), (path, r.status, r.body[:200])

    # alice signs in on the apex and asks for the public VM: the code goes to ussycode's endpoint on that host
    link = await web.login_url(alice)
    r = await a(link, "-H", HTML)
    assert r.status == 303
    r = await a(u(web, "localhost", "/__ussycode/login?next=" + u(web, "web.localhost", "/here")), "-H", HTML)
    assert r.status == 303 and r.headers["location"].startswith(u(web, "web.localhost", "/__ussycode/auth?code="))
    r = await a(r.headers["location"], "-H", HTML)
    assert r.status == 302 and r.headers["location"] == "/here"
    vm_session = a.cookie("__Host-ussy_session")

    # bob removes web; carol makes a new VM with the same name; alice's old cookie opens nothing there
    assert (await web.cmd(bob, "rm", "web", "--yes")).exit_status == 0
    await web.new_vm(carol, "web")
    r = await a(u(web, "web.localhost", "/"), "-H", HTML)
    assert r.status == 302 and "/__ussycode/login" in r.headers["location"], (r.status, r.body[:200])
    r = await a(u(web, "web.localhost", "/"))
    assert r.status == 401
    assert vm_session not in r.body

    # and alice gets no hand-off code for carol's private VM
    r = await a(u(web, "localhost", "/__ussycode/login?next=" + u(web, "web.localhost", "/")), "-H", HTML)
    assert r.status == 403 and "/__ussycode/auth" not in r.headers.get("location", "") + r.body


async def test_share_links_open_one_url_and_rest_as_hashes(tls_web: Web, tmp_path: Path) -> None:
    web = tls_web
    ca = await wait_ca(web)
    bob = await web.server.register("bob")
    await web.new_vm(bob, "web", ports=(8080, 3000))
    main = json.loads((await web.cmd(bob, "share", "add-link", "web", "--json")).stdout)
    port = json.loads((await web.cmd(bob, "share", "add-link", "web", "--port=3000", "--expires=1h", "--json")).stdout)
    assert main["port"] == 8080 and port["port"] == 3000
    assert port["url"].startswith(u(web, "3000-web.localhost", "/?ussy_share="))  # the one URL it opens
    main_token = main["url"].split("ussy_share=")[1]
    port_token = port["url"].split("ussy_share=")[1]

    c = browser(web, ca, tmp_path, "c")
    # the main link does not open the port URL, and the port link does not open the main URL
    r = await c(u(web, "3000-web.localhost", f"/?ussy_share={main_token}"), "-H", HTML)
    assert r.status == 403
    r = await c(u(web, "web.localhost", f"/?ussy_share={port_token}"), "-H", HTML)
    assert r.status == 403
    r = await c(u(web, "3000-web.localhost", f"/?ussy_share={port_token}"), "-H", HTML)
    assert r.status == 302
    assert (await c(u(web, "3000-web.localhost", "/"))).seen()["port"] == 3000
    assert (await c(u(web, "web.localhost", "/"))).status == 401  # its cookie is for the port host only

    # share show lists ids, never tokens; remove-link takes the id, the token or the URL
    shown = json.loads((await web.cmd(bob, "share", "show", "web", "--json")).stdout)
    assert {link["id"] for link in shown["links"]} == {main["id"], port["id"]}
    assert main_token not in json.dumps(shown) and port_token not in json.dumps(shown)
    text = (await web.cmd(bob, "share", "show", "web")).stdout
    assert main["id"] in text and main_token not in text

    # the DB (and its WAL) holds no link token in clear
    db = web.server.data_dir / "ussycode.db"
    raw = b"".join(p.read_bytes() for p in db.parent.glob("ussycode.db*"))
    assert main_token.encode() not in raw and port_token.encode() not in raw
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select id, token_hash, port from share_links").fetchall()
    assert {r[2] for r in rows} == {8080, 3000} and all(len(r[1]) == 64 for r in rows)

    assert (await web.cmd(bob, "share", "remove-link", "web", port["url"])).exit_status == 0
    assert (await c(u(web, "3000-web.localhost", "/"))).status == 401  # revoked on the next request
    assert (await web.cmd(bob, "share", "remove-link", "web", main["id"])).exit_status == 0
    r = await web.cmd(bob, "share", "remove-link", "web", main["id"])
    assert r.exit_status == 1 and "no such share link" in r.stderr
    for hostile in ("-x", "\x1b[31m", "a" * 5000, "https://web.localhost/?ussy_share=", "?", "' OR 1=1 --"):
        r = await web.cmd(bob, "share", "remove-link", "web", hostile)
        assert r.exit_status in (1, 2) and "error" in r.stderr, (hostile[:20], r)
    assert json.loads((await web.cmd(bob, "share", "show", "web", "--json")).stdout)["links"] == []


async def test_custom_domain_claims_cannot_squat(web: Web, needs_vms: None) -> None:
    """Finding 5: a pending claim blocks nobody; the first to prove the domain gets it; pending claims expire.
    Public DNS cannot be reached from here: the TXT lookup is the one stand-in."""
    alice = await web.server.register("alice")
    mallory = await web.server.register("mallory")
    await web.new_vm(alice, "shop")
    await web.new_vm(mallory, "squat")
    txt: dict[str, list[str]] = {}

    async def lookup(name: str) -> list[str]:
        return txt.get(name, [])

    web.server.app.services.shares.txt_lookup = lookup
    r = await web.cmd(mallory, "share", "cname", "squat", "shop.example.com")
    assert r.exit_status == 0, r
    mallory_token = r.stdout.split("TXT")[1].split()[0]
    r = await web.cmd(alice, "share", "cname", "shop", "shop.example.com")
    assert r.exit_status == 0, r  # mallory's unverified claim does not block alice
    alice_token = r.stdout.split("TXT")[1].split()[0]
    assert alice_token != mallory_token
    # mallory cannot verify without the DNS record; alice proves it and gets the domain
    r = await web.cmd(mallory, "share", "cname-verify", "squat", "shop.example.com")
    assert r.exit_status == 1 and "not verified" in r.stderr
    txt["_ussycode-verify.shop.example.com"] = [alice_token]
    assert (await web.cmd(alice, "share", "cname-verify", "shop", "shop.example.com")).exit_status == 0
    # the other pending claim is gone; a new claim on a verified domain is refused
    r = await web.cmd(mallory, "share", "cname-verify", "squat", "shop.example.com")
    assert r.exit_status == 1 and "not claimed" in r.stderr
    r = await web.cmd(mallory, "share", "cname", "squat", "shop.example.com")
    assert r.exit_status == 1 and "already verified" in r.stderr
    shown = (await web.cmd(alice, "share", "show", "shop")).stdout
    assert "shop.example.com: verified" in shown

    # pending claims expire (7 days by default): an old one is neither listed nor verifiable
    r = await web.cmd(mallory, "share", "cname", "squat", "old.example.com")
    assert r.exit_status == 0
    store = web.server.app.services.store
    await store.write(lambda c: c.exec_driver_sql(
        "update custom_domains set created_at = datetime('now', '-8 days') where domain = 'old.example.com'"))
    assert "old.example.com" not in (await web.cmd(mallory, "share", "show", "squat")).stdout
    r = await web.cmd(mallory, "share", "cname-verify", "squat", "old.example.com")
    assert r.exit_status == 1 and "expired" in r.stderr
    r = await web.cmd(alice, "share", "cname", "shop", "old.example.com")
    assert r.exit_status == 0  # and it blocks nobody


async def test_client_address_comes_from_caddy_only(web: Web, needs_vms: None) -> None:
    """Finding 6: a client on the host that talks to the app port with forged X-Forwarded-For (or our own
    client-address header without the per-start key) is limited by its own address."""
    app_port = web.server.app.http_port
    statuses = []
    async with httpx.AsyncClient(timeout=10) as raw:
        for i in range(40):
            r = await raw.get(f"http://127.0.0.1:{app_port}/__ussycode/login?token=bad-token-{i:04d}-xxxxxxxxxxxx",
                              headers={"Host": "localhost", "X-Forwarded-For": f"203.0.113.{i}",
                                       "X-Ussy-Client-Addr": f"198.51.100.{i}", "X-Ussy-Proxy-Key": "guess"})
            statuses.append(r.status_code)
    assert 429 in statuses and statuses.count(400) <= 15, statuses
    # through Caddy, the same forged headers are dropped and Caddy's view of the peer is used
    async with browser_client() as c:
        r = await c.get(web.url("localhost", "/__ussycode/login?token=bad-token-through-caddy-xxxxxxxx"),
                        headers={"X-Forwarded-For": "203.0.113.200", "X-Ussy-Client-Addr": "198.51.100.200"})
        assert r.status_code == 429  # 127.0.0.1 is the same client, already over its limit


async def test_exec_audits_the_address_caddy_saw_and_trusts_only_its_key(web: Web) -> None:
    """/exec reads the client's address as every endpoint does: through Caddy a forged client-address header
    is replaced by Caddy's; on the app port it counts only with this start's proxy key."""
    services = web.server.app.services
    routes = services.routes
    assert routes is not None

    tried = 0

    async def refused_from(url: str, headers: dict[str, str]) -> str:
        nonlocal tried
        tried += 1  # a new token id each time: refusals of one id are audited once a minute
        async with browser_client() as c:
            r = await c.post(url, content="whoami", headers={"Authorization": f"Bearer usy1.nosuchtok{tried:03d}."
                                                             + "A" * 43, "Content-Type": "text/plain", **headers})
        assert r.status_code == 401, r.text
        rows = await services.store.read(lambda c: audit.recent(c, 1, "token.refused"))
        client: str = rows[0]["detail"]["client"]
        return client

    forged = {"X-Forwarded-For": "203.0.113.9", "X-Ussy-Client-Addr": "198.51.100.9"}
    assert await refused_from(web.url("localhost", "/exec"), forged) == "127.0.0.1"
    app = f"http://127.0.0.1:{web.server.app.http_port}/exec"
    assert await refused_from(app, {**forged, "X-Ussy-Proxy-Key": "guess"}) == "127.0.0.1"
    # the first copy of a header counts, as everywhere in Starlette: a second, right key does not
    assert await refused_from(app, {**forged, "X-Ussy-Proxy-Key": "guess",
                                    "x-ussy-proxy-key": routes.proxy_key}) == "127.0.0.1"
    assert await refused_from(app, {**forged, "X-Ussy-Proxy-Key": routes.proxy_key}) == "198.51.100.9"


async def test_bad_tokens_on_a_vm_url_are_limited_per_address(web: Web, needs_vms: None) -> None:
    """A VM URL answers a bad Bearer token 401 with its reason, and a flood of them from one address 429 with
    Retry-After (20 at once, as on /exec), before any token is checked; another address is not affected."""
    alice = await web.server.register("alice")
    await web.new_vm(alice, "vault")
    answers = []
    async with browser_client() as c:
        for i in range(24):
            r = await c.get(web.url("vault.localhost"), headers={"Authorization": f"Bearer usy1.nosuchtok{i:03d}."
                                                                 + "A" * 43, "Accept": "application/json"})
            answers.append((r.status_code, r.json()["reason"], r.headers.get("retry-after")))
    assert answers[0] == (401, "bearer_invalid", None), answers
    assert answers[-1][:2] == (429, "rate_limited") and int(answers[-1][2] or 0) >= 1, answers
    assert [a[0] for a in answers].count(401) == 20, answers
    # the app port, directly, is another client only with Caddy's key: a forged address changes nothing
    routes = web.server.app.services.routes
    assert routes is not None
    async with httpx.AsyncClient() as raw:
        r = await raw.get(f"http://127.0.0.1:{web.server.app.http_port}/__ussycode/forward-auth?k={routes.auth_key}",
                          headers={"X-Forwarded-Host": "vault.localhost", "X-Ussy-Client-Addr": "198.51.100.1",
                                   "Authorization": "Bearer usy1.nosuchtok999." + "A" * 43})
    assert r.status_code == 429, r.text

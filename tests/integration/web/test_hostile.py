"""Hostile input against the HTTPS entry: odd Host headers, forged headers, tampered cookies and codes, open
redirects, the forward-auth endpoint called directly; and a server restart that must bring every route back."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import httpx
import pytest

from .conftest import Web, browser_client
from .test_access import HTML, sign_in

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def test_hostile_hosts_headers_cookies_and_codes(web: Web, needs_vms: None) -> None:
    alice = await web.server.register("alice")
    await web.new_vm(alice, "priv")
    base = f"http://127.0.0.1:{web.port}/"
    async with httpx.AsyncClient(timeout=20) as raw:
        async def get(host: str, path: str = "/", **headers: str) -> httpx.Response:
            return await raw.get(base.rstrip("/") + path, headers={"Host": host, **headers})

        # upper case and an explicit port are the same private VM: never served without a session
        for host in (f"PRIV.LOCALHOST:{web.port}", f"Priv.localhost:{web.port}", "priv.localhost"):
            r = await get(host)
            assert r.status_code == 401, (host, r.status_code)
        # trailing dot, punycode, a.b.<domain>, 500 characters, garbage: never the VM, never a 5xx
        for host in ("priv.localhost.", "xn--prv-bla.localhost", "a.priv.localhost", "p" * 500 + ".localhost",
                     "priv.localhost:notaport", "[::1]", "priv..localhost"):
            r = await get(host)
            assert r.status_code in (400, 401, 404), (host[:40], r.status_code, r.text[:200])
            assert "x-ussy-handle" not in r.text
        # forged forwarding/identity headers do not open a private VM
        r = await get("priv.localhost", "/", **{"X-Forwarded-Host": "localhost", "X-Ussy-Handle": "alice",
                                                "X-Ussy-User-Id": "x", "X-Forwarded-Uri": "/__ussycode/auth"})
        assert r.status_code == 401
        # the forward-auth endpoint cannot be called without Caddy's key (apex or app server directly)
        r = await get("localhost", "/__ussycode/forward-auth", **{"X-Forwarded-Host": "priv.localhost"})
        assert r.status_code == 403
        app_port = web.server.app.http_port
        r = await raw.get(f"http://127.0.0.1:{app_port}/__ussycode/forward-auth?k=guess",
                          headers={"X-Forwarded-Host": "priv.localhost"})
        assert r.status_code == 403
        # bad Bearer -> 401 JSON, never a fallback to cookies
        r = await get("priv.localhost", "/", Authorization="Bearer usy1_nope")
        assert r.status_code == 401 and r.json()["code"] == 401
        # path traversal to our own paths goes nowhere special
        r = await get("priv.localhost", "/x/../__ussycode/auth?code=abc", Accept="text/html")
        assert r.status_code in (302, 400)
        assert "set-cookie" not in r.headers or "ussy_session" not in r.headers["set-cookie"]

    async with browser_client() as c:
        r = await sign_in(web, c, alice, "priv")
        assert r.status_code == 200
        # a tampered session cookie is no session
        cookie = c.cookies.get("ussy_session", domain="priv.localhost.local") or \
            c.cookies.get("ussy_session", domain="priv.localhost")
        assert cookie
        async with browser_client() as t:
            tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
            r = await t.get(web.url("priv.localhost"), headers={**HTML, "Cookie": f"ussy_session={tampered}"})
            assert r.status_code == 302
            # the VM host's cookie is not the apex's, and the apex's is not a VM's
            r = await t.get(web.url("localhost"), headers={"Cookie": f"ussy_session={cookie}"})
            assert "Signed in as" not in r.text
        # hand-off codes: tampered, replayed, or for another host are refused
        r = await c.get(web.url("localhost", "/__ussycode/login?next=" +
                                quote(web.url("priv.localhost", "/p"), safe="")))
        assert r.status_code == 303
        handoff = r.headers["location"]
        async with browser_client() as t:
            r = await t.get(handoff.replace("code=", "code=x"), headers=HTML)
            assert r.status_code == 400
            r = await t.get(handoff.replace("priv.localhost", "3000-priv.localhost"), headers=HTML)
            assert r.status_code == 400
            r = await t.get(handoff, headers=HTML)
            assert r.status_code == 302 and "ussy_session=" in r.headers["set-cookie"]
            assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Lax" in r.headers["set-cookie"]
            r = await t.get(handoff, headers=HTML)
            assert r.status_code == 400  # one time only
        # no open redirects from the login endpoint
        for evil in ("https://evil.example/", "//evil.example/", "http://localhost.evil.example/",
                     "javascript:alert(1)", web.url("nosuch.localhost")):
            r = await c.get(web.url("localhost", "/__ussycode/login?next=" + quote(evil, safe="")))
            assert r.status_code == 303 and r.headers["location"] == "/", (evil, r.headers.get("location"))
        # a used or garbage login token
        r = await c.get(web.url("localhost", "/__ussycode/login?token=" + "A" * 43))
        assert r.status_code == 400
        r = await c.get(web.url("localhost", "/__ussycode/login?token=<script>"))
        assert r.status_code == 400 and "<script>" not in r.text

    # an expired share link is refused
    r = await web.cmd(alice, "share", "add-link", "priv", "--expires=1s", "--json")
    link = json.loads(r.stdout)
    await asyncio.sleep(2.1)
    async with browser_client() as c:
        r = await c.get(link["url"], headers=HTML)
        assert r.status_code == 403 and "invalid" in r.text.lower()


async def test_login_rate_limit(web: Web) -> None:
    async with browser_client() as c:
        codes = [(await c.get(web.url("localhost", f"/__ussycode/login?token={'B' * 40}{i:03d}"))).status_code
                 for i in range(14)]
    assert codes[0] == 400 and 429 in codes


async def test_restart_brings_routes_and_sessions_back(web_factory, tmp_path, needs_vms: None) -> None:
    data = tmp_path / "data"
    web: Web = await web_factory(data)
    alice = await web.server.register("alice")
    await web.new_vm(alice, "keep")
    await web.new_vm(alice, "pubby")
    assert (await web.cmd(alice, "share", "set-public", "pubby")).exit_status == 0
    async with browser_client() as c:
        assert (await sign_in(web, c, alice, "keep")).status_code == 200
        port = web.port
        await web.server.app.stop()
        r2: Web = await web_factory(data, port=port)
        # no VM was touched: the apps inside are still running, and every route is back
        r = await c.get(r2.url("pubby.localhost"))
        assert r.status_code == 200, r.text
        r = await c.get(r2.url("keep.localhost"), headers=HTML)
        assert r.status_code == 200 and r.json()["headers"]["x-ussy-handle"] == "alice"  # session survived
        # another port is another host: the apex session (also from before the restart) hands off to it
        r = await c.get(r2.url("3000-keep.localhost"), headers=HTML)
        assert r.status_code == 302 and "/__ussycode/login" in r.headers["location"]
        for _ in range(3):
            r = await c.get(str(r.request.url.join(r.headers["location"])), headers=HTML)
            if r.status_code not in (302, 303):
                break
        assert r.status_code == 502 and "nothing answers on this port" in r.text  # allowed; nothing on 3000

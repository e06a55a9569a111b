"""VM URLs through the real Caddy, real app server and a real VM: sessions, sharing, links, identity headers."""

from __future__ import annotations

import json

import httpx
import pytest

from ussycode.store import audit

from .conftest import Web, browser_client

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

HTML = {"Accept": "text/html,application/xhtml+xml"}


async def sign_in(web: Web, client: httpx.AsyncClient, key, vm: str) -> httpx.Response:
    """The browser flow: VM URL -> login page -> `browser` link -> apex session -> hand-off -> the VM page.
    A user without access to the VM gets the apex's 403 page instead of a hand-off."""
    r = await client.get(web.url(f"{vm}.localhost", "/page?x=1"), headers=HTML)
    assert r.status_code == 302, r.text
    login = r.headers["location"]
    assert login.startswith(f"http://localhost:{web.port}/__ussycode/login?next="), login
    r = await client.get(login, headers=HTML)
    assert r.status_code == 200 and "browser" in r.text
    r = await client.get(await web.login_url(key), headers=HTML)
    if r.status_code == 403:
        return r
    assert r.status_code == 303, r.text
    handoff = r.headers["location"]
    assert handoff.startswith(f"http://{vm}.localhost:{web.port}/__ussycode/auth?code="), handoff
    r = await client.get(handoff, headers=HTML)
    assert r.status_code == 302 and r.headers["location"] == "/page?x=1", (r.status_code, r.text)
    return await client.get(web.url(f"{vm}.localhost", "/page?x=1"), headers=HTML)


async def test_private_vm_session_share_and_logout(web: Web, needs_vms: None) -> None:
    alice = await web.server.register("alice")
    bob = await web.server.register("bob")
    await web.new_vm(alice, "web")

    async with browser_client() as anon:
        r = await anon.get(web.url("web.localhost"), headers=HTML)
        assert r.status_code == 302 and "/__ussycode/login" in r.headers["location"]
        r = await anon.get(web.url("web.localhost"))
        assert r.status_code == 401 and r.json()["code"] == 401

    async with browser_client() as a:
        r = await sign_in(web, a, alice, "web")
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["path"] == "/page?x=1"
        h = seen["headers"]
        assert h["x-ussy-handle"] == "alice" and h["x-ussy-access"] == "owner" and h["x-ussy-user-id"]
        # forged identity headers never reach the app
        r = await a.get(web.url("web.localhost"), headers={"X-Ussy-Handle": "mallory", "X-Ussy-Email": "m@x.io",
                                                           "X-Forwarded-Host": "evil.example"})
        h = r.json()["headers"]
        assert h["x-ussy-handle"] == "alice" and "x-ussy-email" not in h
        assert h["x-forwarded-host"] == f"web.localhost:{web.port}"
        # the apex landing page lists the VM
        r = await a.get(web.url("localhost"))
        assert "alice" in r.text and "web.localhost" in r.text

        async with browser_client() as b:
            # bob is signed in but the VM is not shared with him
            r = await sign_in(web, b, bob, "web")
            assert r.status_code == 403 and "not shared with you" in r.text
            assert "/__ussycode/auth" not in r.text  # no hand-off code for a host he may not open
            assert (await web.cmd(alice, "share", "add", "web", "bob")).exit_status == 0
            r = await b.get(web.url("web.localhost"), headers=HTML)  # no session for web yet: via the apex
            assert r.status_code == 302
            r = await b.get(r.headers["location"], headers=HTML)
            assert r.status_code == 303 and "/__ussycode/auth?code=" in r.headers["location"]
            r = await b.get(r.headers["location"], headers=HTML)
            assert r.status_code == 302
            r = await b.get(web.url("web.localhost"), headers=HTML)
            assert r.status_code == 200 and r.json()["headers"]["x-ussy-access"] == "shared"
            assert r.json()["headers"]["x-ussy-handle"] == "bob"
            assert (await web.cmd(alice, "share", "remove", "web", "bob")).exit_status == 0
            r = await b.get(web.url("web.localhost"), headers=HTML)
            assert r.status_code == 403

        # logout: a form with a CSRF token, then the VM host is shut out too
        r = await a.get(web.url("localhost", "/__ussycode/logout"))
        assert r.status_code == 200
        csrf = r.text.split("name=csrf value='")[1].split("'")[0]
        r = await a.post(web.url("localhost", "/__ussycode/logout"), data={"csrf": "forged"})
        assert r.status_code == 403
        r = await a.get(web.url("web.localhost"), headers=HTML)
        assert r.status_code == 200  # still signed in after the refused forgery
        r = await a.post(web.url("localhost", "/__ussycode/logout"), data={"csrf": csrf})
        assert r.status_code == 200 and "signed out" in r.text.lower()
        r = await a.get(web.url("web.localhost"), headers=HTML)
        assert r.status_code == 302 and "/__ussycode/login" in r.headers["location"]

    rows = await web.server.app.services.store.read(lambda c: audit.recent(c, 200))
    actions = {row["action"] for row in rows}
    assert {"web.login_link", "web.login", "web.logout", "share.add", "share.remove"} <= actions


async def test_public_links_ports_and_json(web: Web, needs_vms: None) -> None:
    alice = await web.server.register("alice")
    await web.new_vm(alice, "site", ports=(8080, 3000))

    r = await web.cmd(alice, "share", "show", "site", "--json")
    assert r.exit_status == 0, r
    assert json.loads(r.stdout) == {"vm": "site", "public": False, "ports": [], "users": [], "links": [],
                                    "receive_email": False}

    async with browser_client() as anon:
        assert (await anon.get(web.url("site.localhost"))).status_code == 401
        assert (await web.cmd(alice, "share", "set-public", "site")).exit_status == 0
        r = await anon.get(web.url("site.localhost"), headers={"X-Ussy-Handle": "forged"})
        assert r.status_code == 200 and not [k for k in r.json()["headers"] if k.startswith("x-ussy-")]
        # another port stays private until made public
        assert (await anon.get(web.url("3000-site.localhost"))).status_code == 401
        assert (await web.cmd(alice, "share", "set-public", "site", "--port=3000")).exit_status == 0
        r = await anon.get(web.url("3000-site.localhost"))
        assert r.status_code == 200 and r.json()["port"] == 3000
        assert (await web.cmd(alice, "share", "set-private", "site")).exit_status == 0
        assert (await anon.get(web.url("site.localhost"))).status_code == 401
        assert (await anon.get(web.url("3000-site.localhost"))).status_code == 200

    # share link: a fresh browser gets in; after remove-link it is refused on its next request
    r = await web.cmd(alice, "share", "add-link", "site", "--expires=1h", "--json")
    assert r.exit_status == 0, r
    link = json.loads(r.stdout)
    assert set(link) == {"id", "url", "port", "expires_at"} and link["port"] == 8080
    token = link["url"].split("ussy_share=")[1]
    assert link["url"] == f"http://site.localhost:{web.port}/?ussy_share={token}"
    async with browser_client() as c:
        r = await c.get(link["url"], headers=HTML)
        assert r.status_code == 302 and r.headers["location"] == f"http://site.localhost:{web.port}/"
        r = await c.get(web.url("site.localhost"), headers=HTML)
        assert r.status_code == 200 and r.json()["headers"]["x-ussy-access"] == "share-link"
        assert "ussy_share" not in r.json()["path"]
        # the link of one VM does not open another
        await web.new_vm(alice, "other")
        r = await c.get(web.url("other.localhost", f"/?ussy_share={token}"), headers=HTML)
        assert r.status_code == 403
        shown = json.loads((await web.cmd(alice, "share", "show", "site", "--json")).stdout)
        assert shown["links"] == [{"id": link["id"], "port": 8080, "expires_at": link["expires_at"], "uses": 1}]
        assert shown["ports"] == [3000] and shown["public"] is False
        assert token not in json.dumps(shown)
        assert (await web.cmd(alice, "share", "remove-link", "site", link["id"])).exit_status == 0
        r = await c.get(web.url("site.localhost"), headers=HTML)
        assert r.status_code == 302 and "/__ussycode/login" in r.headers["location"]


async def test_stopped_unknown_and_removed_vms(web: Web, needs_vms: None) -> None:
    alice = await web.server.register("alice")
    await web.new_vm(alice, "box")
    assert (await web.cmd(alice, "share", "set-public", "box")).exit_status == 0
    async with browser_client() as c:
        assert (await c.get(web.url("box.localhost"))).status_code == 200
        # running, nothing on the port: its own page (HTML for a browser, JSON for an API client)
        assert (await web.cmd(alice, "share", "set-public", "box", "--port=4000")).exit_status == 0
        r = await c.get(web.url("4000-box.localhost"), headers=HTML)
        assert r.status_code == 502 and "nothing answers on this port" in r.text, r.text
        r = await c.get(web.url("4000-box.localhost"))
        assert r.status_code == 502 and r.json()["reason"] == "no_listener", r.text
        assert (await web.cmd(alice, "stop", "box")).exit_status == 0
        r = await c.get(web.url("box.localhost"), headers=HTML)
        assert r.status_code == 503 and "box is stopped" in r.text and "start box" in r.text, r.text
        r = await c.get(web.url("box.localhost"))
        assert r.status_code == 503 and r.json()["reason"] == "vm_stopped", r.text
        r = await c.get(web.url("nosuchvm.localhost"), headers=HTML)
        assert r.status_code == 404 and "No such VM" in r.text
        r = await c.get(web.url("nosuchvm.localhost"))
        assert r.status_code == 404 and r.json() == {"error": "Nothing is served at this address.", "code": 404,
                                                     "reason": "unknown_vm"}, r.text
        assert (await web.cmd(alice, "share", "add-link", "box")).exit_status == 0
        assert (await web.cmd(alice, "rm", "box", "--yes")).exit_status == 0
        r = await c.get(web.url("box.localhost"))
        assert r.status_code == 404
    counts = await web.server.app.services.store.read(lambda c: [
        c.exec_driver_sql(f"select count(*) from {t}").scalar_one()
        for t in ("vm_public_ports", "share_links", "vm_shares")])
    assert counts == [0, 0, 0]


async def test_custom_domain_verify_route_and_tls_ask(web: Web, needs_vms: None) -> None:
    """Custom domains. Public DNS cannot be reached from here: the TXT lookup is the one stand-in."""
    alice = await web.server.register("alice")
    await web.new_vm(alice, "cnm")
    txt: dict[str, list[str]] = {}

    async def lookup(name: str) -> list[str]:
        return txt.get(name, [])

    shares = web.server.app.services.shares
    shares.txt_lookup = lookup
    r = await web.cmd(alice, "share", "cname", "cnm", "App.Example.COM.")
    assert r.exit_status == 0 and "_ussycode-verify.app.example.com" in r.stdout, r
    token = r.stdout.split("TXT")[1].split()[0]
    assert (await web.cmd(alice, "share", "cname", "cnm", "sub.localhost")).exit_status != 0
    r = await web.cmd(alice, "share", "cname-verify", "cnm", "app.example.com")
    assert r.exit_status == 1 and "not verified" in r.stderr
    async with httpx.AsyncClient(timeout=20) as raw:
        base = f"http://127.0.0.1:{web.port}/"
        assert (await raw.get(base, headers={"Host": "app.example.com"})).status_code == 404
        ask = f"http://127.0.0.1:{web.server.app.http_port}/__ussycode/tls-ask?domain="
        assert (await raw.get(ask + "app.example.com")).status_code == 403
        assert (await raw.get(ask + "cnm.localhost")).status_code == 200
        assert (await raw.get(ask + "nosuch.localhost")).status_code == 403
        txt["_ussycode-verify.app.example.com"] = ["other", token]
        assert (await web.cmd(alice, "share", "cname-verify", "cnm", "app.example.com")).exit_status == 0
        assert (await raw.get(ask + "app.example.com")).status_code == 200
        r = await raw.get(base, headers={"Host": "app.example.com"})
        assert r.status_code == 401  # same access rules as the VM URL: private
        assert (await web.cmd(alice, "share", "set-public", "cnm")).exit_status == 0
        r = await raw.get(base, headers={"Host": "app.example.com", "X-Ussy-Handle": "forged"})
        assert r.status_code == 200 and "x-ussy-handle" not in r.json()["headers"]
        assert (await web.cmd(alice, "share", "cname-rm", "cnm", "app.example.com")).exit_status == 0
        assert (await raw.get(base, headers={"Host": "app.example.com"})).status_code == 404

"""The admin panel in headless Chromium, through the managed Caddy with ``--tls internal`` (HTTPS, ``__Host-``
cookies): sign-in with ``browser`` lands on the panel, every page renders, every action works and shows in the
lobby, a forged cross-site POST and a POST without the CSRF token are refused, an operator cannot grant admin,
a newbie is shut out, and the audit log exports as CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser as PwBrowser
from playwright.async_api import Page

from .browser import CHROMIUM, TIMEOUT_MS, chromium

pytestmark = [pytest.mark.asyncio, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")]

SCREENS = Path(__file__).resolve().parents[2] / "bench" / "results" / "screens"


@asynccontextmanager
async def fresh_page(browser: PwBrowser) -> AsyncIterator[Page]:
    """A new browser context (its own cookies) that trusts the server's internal CA certificate."""
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1100, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def login_url(web, key: Path) -> str:
    r = await web.server.ssh(key, "browser")
    assert r.exit_status == 0, r
    match = re.search(r"https://\S+/__ussycode/login\?token=\S+", r.stdout)
    assert match, r.stdout
    return match.group(0)


async def submit(page: Page, selector: str) -> str:
    async with page.expect_navigation(wait_until="load"):
        await page.click(selector)
    return await page.inner_text("body")


async def whoami(web, key: Path) -> dict[str, object]:
    r = await web.server.ssh(key, "whoami", "--json")
    return {"exit": r.exit_status, **(json.loads(r.stdout) if r.exit_status == 0 else {"stderr": r.stderr})}


async def test_admin_panel_in_chromium(web_factory) -> None:
    web = await web_factory(tls="internal")
    apex = f"https://localhost:{web.port}"
    root = await web.server.register("root1")  # first account: admin
    bob = await web.server.register("bob")
    carol = await web.server.register("carol")
    SCREENS.mkdir(parents=True, exist_ok=True)

    async with chromium() as browser, fresh_page(browser.browser) as a:
        # not signed in: the panel sends the browser to sign in, and the link brings it back to the panel
        await a.goto(f"{apex}/admin/users")
        assert "/__ussycode/login" in a.url
        await a.goto(await login_url(web, root))
        assert a.url == f"{apex}/admin/users", a.url
        await a.goto(f"{apex}/admin/")
        text = await a.inner_text("body")
        assert "Dashboard" in text and (await a.inner_text("#users-total")) == "3"
        await a.screenshot(path=str(SCREENS / "admin-dashboard.png"))

        # every page renders
        for path, heading in (("/admin/users", "Users"), ("/admin/users/bob", "bob"), ("/admin/vms", "VMs"),
                              ("/admin/shares", "Shares"), ("/admin/tokens", "Active API tokens"),
                              ("/admin/audit", "Audit log"), ("/admin/users?q=ca", "Users")):
            response = await a.goto(apex + path)
            assert response is not None and response.status == 200, path
            assert heading in await a.inner_text("h1"), path
        assert "carol" in await a.inner_text("#users") and "bob" not in await a.inner_text("#users")

        # raise bob to citizen: the lobby shows it at once
        await a.goto(f"{apex}/admin/users/bob")
        await a.select_option("#tier-select", "citizen")
        assert "bob is now citizen" in await submit(a, "#set-trust")
        assert (await whoami(web, bob))["trust_level"] == "citizen"
        # a quota override
        await a.fill("input[name=vms]", "7")
        assert "quota of bob updated" in await submit(a, "#set-quota")
        assert (await whoami(web, bob))["quota"]["vms"] == 7  # type: ignore[index]
        # suspend (with a reason) and unsuspend: the lobby says so, then works again
        await a.fill("#reason", "testing")
        assert "bob is suspended" in await submit(a, "#suspend")
        assert (await a.inner_text("#state")) == "suspended"
        gone = await whoami(web, bob)
        assert gone["exit"] == 1 and "suspended (testing)" in str(gone["stderr"])
        await a.screenshot(path=str(SCREENS / "admin-user.png"))
        assert "no longer suspended" in await submit(a, "#unsuspend")
        assert (await whoami(web, bob))["exit"] == 0
        # make carol an operator (for the next part)
        await a.goto(f"{apex}/admin/users/carol")
        await a.select_option("#tier-select", "operator")
        assert "carol is now operator" in await submit(a, "#set-trust")
        # the admin cannot demote themselves (nobody changes their own tier)
        await a.goto(f"{apex}/admin/users/root1")
        await a.select_option("#tier-select", "newbie")
        assert "your own" in await submit(a, "#set-trust")

        # a POST without the session's CSRF token (same origin, cookie sent) is refused
        refused = await a.context.request.post(f"{apex}/admin/users/bob/trust", form={"tier": "admin"},
                                               max_redirects=0)
        assert refused.status == 403 and "security token" in await refused.text()
        # ... and with a token from the page but from another origin
        token = await a.get_attribute("input[name=csrf]", "value")
        refused = await a.context.request.post(f"{apex}/admin/users/bob/trust", max_redirects=0,
                                               form={"tier": "admin", "csrf": token or ""},
                                               headers={"Origin": "https://evil.localhost:1"})
        assert refused.status == 403 and "another site" in await refused.text()
        # a forged cross-site form post (another origin, auto-submitted) changes nothing
        forged = ("<form id=f method=post action='" + apex + "/admin/users/bob/trust'>"
                  "<input name=tier value=admin><input name=csrf value=guess></form>"
                  "<script>document.getElementById('f').submit()</script>")
        await a.goto("data:text/html," + forged)
        await a.wait_for_load_state("load")
        await asyncio.sleep(0.5)
        assert (await whoami(web, bob))["trust_level"] == "citizen"

        # the audit log shows the actions, filters, and exports as CSV
        await a.goto(f"{apex}/admin/audit?actor=root1&action=admin.")
        audit_text = await a.inner_text("#audit")
        assert "admin.set_trust" in audit_text and "admin.suspend" in audit_text
        csv_url = await a.get_attribute("#csv", "href")
        assert csv_url is not None
        response = await a.context.request.get(apex + csv_url)
        assert response.status == 200 and response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(await response.text())))
        assert {"admin.set_trust", "admin.suspend", "admin.unsuspend", "admin.quota"} <= {r["action"] for r in rows}
        assert all(r["actor"] == "root1" for r in rows)

        # every VM action: bob's VM stopped, started, its console, removed after typing its name; his token revoked
        assert (await web.server.ssh(bob, "new", "--name=bobbox", timeout=180)).exit_status == 0
        token = json.loads((await web.server.ssh(bob, "token", "create", "--json")).stdout)
        await a.goto(f"{apex}/admin/vms/bobbox")
        assert "bobbox: stop done (stopped)" in await submit(a, "#stop")
        assert json.loads((await web.server.ssh(bob, "ls", "--json")).stdout)[0]["status"] == "stopped"
        assert "bobbox: start done (running)" in await submit(a, "#start")
        assert (await a.inner_text("#console")).strip()  # the boot's console tail
        await a.fill("#confirm-rm", "wrong-name")
        assert "type the VM's name" in await submit(a, "#rm")
        await a.fill("#confirm-rm", "bobbox")
        assert "bobbox was removed" in await submit(a, "#rm")
        assert json.loads((await web.server.ssh(bob, "ls", "--json")).stdout) == []
        await a.goto(f"{apex}/admin/tokens")
        assert token["id"] in await a.inner_text("#tokens")
        assert "revoked" in await submit(a, f"form[action='/admin/tokens/{token['id']}/revoke'] button")
        r = await web.server.ssh(bob, "token", "list", "--json")
        assert json.loads(r.stdout)[0]["status"] == "revoked"

    async with chromium() as browser, fresh_page(browser.browser) as c:
        # the operator signs in; granting admin is refused, bob stays citizen
        await c.goto(await login_url(web, carol))
        await c.goto(f"{apex}/admin/users/bob")
        await c.select_option("#tier-select", "admin")
        assert "only an admin can grant admin" in await submit(c, "#set-trust")
        assert (await whoami(web, bob))["trust_level"] == "citizen"
        # nor act on the admin
        await c.goto(f"{apex}/admin/users/root1")
        await c.fill("#reason", "coup")
        assert "only an admin can act on admins" in await submit(c, "#suspend")
        assert (await whoami(web, root))["exit"] == 0

    async with chromium() as browser, fresh_page(browser.browser) as b:
        # a newbie... a citizen is shut out of the panel
        await b.goto(await login_url(web, bob))
        response = await b.goto(f"{apex}/admin/")
        assert response is not None and response.status == 403
        assert "Operators only" in await b.inner_text("body")

    async with chromium() as browser, fresh_page(browser.browser) as a:
        # deleting an account takes its typed handle; then it cannot log in
        await a.goto(await login_url(web, root))
        await a.goto(f"{apex}/admin/users/carol")
        await a.fill("#confirm-delete", "carl")
        assert "type the handle" in await submit(a, "#delete")
        await a.fill("#confirm-delete", "carol")
        assert "carol was deleted" in await submit(a, "#delete")
        r = await web.server.ssh(carol, "whoami")
        assert r.exit_status == 1 and "unregistered key" in r.stderr


async def test_panel_pages_on_a_large_instance(server_factory, tmp_path_factory, test_image: object) -> None:
    """10,000 users (the bench adds 50,000 VMs and a million audit rows, and times it): every page answers,
    counts and pagination are right, filters narrow."""
    import httpx
    from bench.admin_data import RUNNING_EVERY, populate

    from ussycode.auth.identity import Actor
    from ussycode.runtime.fake import FakeRuntime
    from ussycode.store.db import Store

    data = tmp_path_factory.mktemp("b")  # a short path: unix socket paths live under it
    store = Store(f"sqlite:///{data / 'ussycode.db'}")
    store.migrate()
    host = populate(store, n_users=10_000, n_vms=10_000, n_audit=20_000)
    store.close()
    server = await server_factory(data, runtime=FakeRuntime(host))
    s = server.app.services
    boss = await s.users.by_handle("boss")
    redeemed = await s.sessions.redeem_login_token(await s.sessions.create_login_token(Actor(boss, "ssh")),
                                                   "localhost")
    headers = {"Host": "localhost", "Cookie": f"ussy_session={redeemed[0]}"}
    base = f"http://127.0.0.1:{server.app.http_port}"
    async with httpx.AsyncClient(timeout=60, headers=headers) as c:
        r = await c.get(f"{base}/admin/")
        assert r.status_code == 200 and '<b id="users-total">10000</b>' in r.text and "10000" in r.text
        r = await c.get(f"{base}/admin/users?page=200")
        assert r.status_code == 200 and "10000 in all" in r.text and "user09999" in r.text and 'id="next"' not in r.text
        r = await c.get(f"{base}/admin/users?q=user0004")
        assert "10 in all" in r.text  # user00040 .. user00049
        r = await c.get(f"{base}/admin/vms?status=error")
        failed = sum(1 for i in range(10_000) if i % RUNNING_EVERY != 1 and i % 4 == 3)
        assert f"{failed} in all" in r.text, re.findall(r"\d+ in all", r.text)
        r = await c.get(f"{base}/admin/audit?action=vm.stop")
        assert r.status_code == 200 and r.text.count("<td>vm.stop</td>") == 50 and 'id="next"' in r.text
        older = re.search(r'href="(/admin/audit\?[^"]*before=\d+)"', r.text)
        assert older is not None
        r = await c.get(base + older.group(1).replace("&amp;", "&"))
        assert r.status_code == 200 and r.text.count("<td>vm.stop</td>") == 50
        for path in ("/admin/users/user00077", "/admin/tokens?page=400", "/admin/shares", "/admin/vms?page=200"):
            assert (await c.get(base + path)).status_code == 200, path
        # hostile query strings get an answer, never a crash
        for path in ("/admin/users?page=-5", "/admin/users?page=abc", "/admin/audit?before=zz",
                     "/admin/audit?since=forever", "/admin/audit?from=2026-13-45", "/admin/vms?status=%00",
                     "/admin/users?q=" + "%" * 500, "/admin/users/" + "x" * 300, "/admin/vms/%2e%2e"):
            r = await c.get(base + path)
            assert r.status_code in (200, 400, 404), (path, r.status_code, r.text[:200])

"""A new user's browser, for real: headless Chromium (CDP) against the real server, Caddy and a real VM.

Private by default -> login page; ``browser`` link -> the VM page with the user's identity; logout -> shut out;
public -> anyone; share link -> a fresh browser gets in, and is refused after ``share remove-link``;
``share add``/``share remove`` -> another user's session gets in, then is refused at once.
Screenshots of the login page and the VM page are kept under ``bench/results/screens`` for a person to look at.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cdp import CHROMIUM, chromium

pytestmark = [pytest.mark.asyncio, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")]

SCREENS = Path(__file__).resolve().parents[2] / "bench" / "results" / "screens"


async def test_new_user_in_a_real_browser(web, needs_vms: None) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    alice = await web.server.register("alice")
    bob = await web.server.register("bob")
    await web.new_vm(alice, "demo")
    vm_url = web.url("demo.localhost", "/hello")

    async with chromium() as browser:
        a = await browser.new_tab()
        # private by default: the login page, which says how to sign in
        final = await a.goto(vm_url)
        assert "/__ussycode/login" in final, final
        text = await a.text()
        assert "browser" in text and "ssh" in text
        await a.screenshot(SCREENS / "login.png")

        # the one-time link signs this browser in and brings it back to the VM page
        final = await a.goto(await web.login_url(alice))
        assert final == vm_url, final
        seen = json.loads(await a.text())
        assert seen["headers"]["x-ussy-handle"] == "alice" and seen["headers"]["x-ussy-access"] == "owner"
        await a.screenshot(SCREENS / "vm.png")
        # the apex shows who is signed in
        await a.goto(web.url("localhost"))
        assert "Signed in as alice" in await a.text()

        # logout (a form with a CSRF token) shuts the VM host out too
        await a.goto(web.url("localhost", "/__ussycode/logout"))
        await a.click("#logout")
        assert "signed out" in (await a.text()).lower()
        assert "/__ussycode/login" in await a.goto(vm_url)

        # public: anyone; private again: not
        assert (await web.cmd(alice, "share", "set-public", "demo")).exit_status == 0
        anyone = await browser.new_tab()
        assert await anyone.goto(vm_url) == vm_url
        assert "x-ussy-handle" not in await anyone.text()
        assert (await web.cmd(alice, "share", "set-private", "demo")).exit_status == 0
        assert "/__ussycode/login" in await anyone.goto(vm_url)

        # a share link works in a fresh browser, until it is removed
        link = json.loads((await web.cmd(alice, "share", "add-link", "demo", "--json")).stdout)
        fresh = await browser.new_tab()
        final = await fresh.goto(link["url"])
        assert final == web.url("demo.localhost", "/"), final
        assert json.loads(await fresh.text())["headers"]["x-ussy-access"] == "share-link"
        assert await fresh.goto(vm_url) == vm_url
        assert (await web.cmd(alice, "share", "remove-link", "demo", link["id"])).exit_status == 0
        assert "/__ussycode/login" in await fresh.goto(vm_url)

        # bob: signed in, not shared -> refused; shared -> in; unshared -> refused on the next request
        b = await browser.new_tab()
        await b.goto(vm_url)
        final = await b.goto(await web.login_url(bob))
        assert "not shared with you" in await b.text(), (final, await b.text())
        assert (await web.cmd(alice, "share", "add", "demo", "bob")).exit_status == 0
        assert await b.goto(vm_url) == vm_url
        assert json.loads(await b.text())["headers"]["x-ussy-handle"] == "bob"
        assert (await web.cmd(alice, "share", "remove", "demo", "bob")).exit_status == 0
        await b.goto(vm_url)
        assert "not shared with you" in await b.text()

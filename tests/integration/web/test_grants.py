"""Signed-in visitors on the fast path (proxy.grants), through the real Caddy, app server and a real VM: the
first signed-in request goes through forward-auth and leaves a grant; the following ones are let through by
Caddy itself with the right identity, until anything is written to the database."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ussycode.api import auth_endpoint
from ussycode.proxy.manager import ManagedCaddy
from ussycode.store.schema import users

from .conftest import Web, browser_client, free_port
from .test_access import HTML, sign_in
from .test_front_door import auth_decisions, run

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def set_email(web: Web, handle: str, email: str) -> None:
    await web.server.app.services.store.write(
        lambda c: c.execute(sa.update(users).where(users.c.handle == handle).values(email=email)))


def grants_of(web: Web, host: str) -> list[str]:
    folder = web.server.app.https.routes.grants.root / host
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def test_signed_in_requests_skip_forward_auth_until_anything_changes(
        web: Web, needs_vms: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_endpoint, "REPLAY_TTL", 60.0)  # the grants' life here: only changes end them
    alice = await web.server.register("alice")
    bob = await web.server.register("bob")
    await web.new_vm(alice, "grv")
    await set_email(web, "alice", "alice+dev@example.org")
    async with browser_client() as a, browser_client() as b:
        r = await sign_in(web, a, alice, "grv")  # the first signed-in request: forward-auth, which grants
        assert r.status_code == 200 and r.json()["headers"]["x-ussy-handle"] == "alice"
        grant = a.cookies["ussy_grant"]
        assert grants_of(web, "grv.localhost") == [grant]
        before = auth_decisions()
        for i in range(20):
            r = await a.get(web.url("grv.localhost", f"/n{i}"), headers={"X-Ussy-Handle": "mallory",
                                                                        "X-Ussy-Access": "owner"})
            assert r.status_code == 200 and r.json()["path"] == f"/n{i}"
            h = r.json()["headers"]
            assert (h["x-ussy-handle"], h["x-ussy-access"], h["x-ussy-email"]) == (
                "alice", "owner", "alice+dev@example.org"), h
            assert h["x-ussy-user-id"] and "ussy_" not in h.get("cookie", "")  # our cookies never reach the app
        assert auth_decisions() == before  # Caddy let all 20 through by itself

        session = a.cookies.get("ussy_session", domain="grv.localhost")
        other_mac = grant[:-1] + ("A" if grant[-1] != "A" else "E")  # a MAC's last letter is one of 16
        for forged in (grant.replace("~alice~", "~bob~"), grant.replace("owner~", "shared~", 1), other_mac):
            assert forged != grant
            # a grant whose file does not exist is no grant: forward-auth decides, on the session
            both = {"Cookie": f"ussy_session={session}; ussy_grant={forged}"}
            r = await a.get(web.url("grv.localhost"), headers=both)
            assert r.status_code == 200 and r.json()["headers"]["x-ussy-handle"] == "alice"
            r = await b.get(web.url("grv.localhost"), headers={"Cookie": f"ussy_grant={forged}"})
            assert r.status_code == 401, r.text
        # a grant names one host: the same cookie on the VM's port URL or an unknown host grants nothing
        for host, status in (("3000-grv.localhost", 401), ("nosuch.localhost", 404)):
            r = await b.get(web.url(host), headers={"Cookie": f"ussy_grant={grant}"})
            assert r.status_code == status, (host, r.text)

        # bob, once shared with, is let through by Caddy too; removing the share shuts him out at once
        assert (await web.cmd(alice, "share", "add", "grv", "bob")).exit_status == 0
        assert grants_of(web, "grv.localhost") == []  # the write took every grant with it
        assert (await sign_in(web, b, bob, "grv")).json()["headers"]["x-ussy-access"] == "shared"
        before = auth_decisions()
        for _ in range(5):
            h = (await b.get(web.url("grv.localhost"))).json()["headers"]
            assert (h["x-ussy-handle"], h["x-ussy-access"]) == ("bob", "shared") and "x-ussy-email" not in h
        assert auth_decisions() == before
        assert (await web.cmd(alice, "share", "remove", "grv", "bob")).exit_status == 0
        r = await b.get(web.url("grv.localhost"), headers=HTML)
        assert r.status_code == 403 and "not shared with you" in r.text

        # a grant lives no longer than forward-auth's answers may be replayed (nor than its session)
        monkeypatch.setattr(auth_endpoint, "REPLAY_TTL", 0.3)
        assert (await a.get(web.url("grv.localhost"))).status_code == 200  # forward-auth: a new grant
        assert grants_of(web, "grv.localhost") == [grant]
        await asyncio.sleep(0.6)
        assert grants_of(web, "grv.localhost") == [] and web.server.app.https.routes.grants.count == 0
        before = auth_decisions()
        assert (await a.get(web.url("grv.localhost"))).json()["headers"]["x-ussy-handle"] == "alice"
        assert auth_decisions() == before + 1

        # a stopped VM: the grant went with the write, and the page says so
        monkeypatch.setattr(auth_endpoint, "REPLAY_TTL", 60.0)
        assert (await a.get(web.url("grv.localhost"))).status_code == 200
        assert (await web.cmd(alice, "stop", "grv")).exit_status == 0
        r = await a.get(web.url("grv.localhost"))
        assert r.status_code == 503 and "stopped" in r.text, r.text
        assert (await web.cmd(alice, "start", "grv")).exit_status == 0
        await web.serve_echo(alice, "grv", 8080)
        assert (await a.get(web.url("grv.localhost"))).status_code == 200
        renewed = grants_of(web, "grv.localhost")
        if web.server.app.https.routes.hosts.links is None:
            assert renewed == [grant]
        else:  # the VM started again has a new link, so its port a new routed address, which the grant names
            assert len(renewed) == 1 and renewed[0].split("~")[5] != grant.split("~")[5]
        before = auth_decisions()
        r = await a.get(web.url("grv.localhost"))
        assert r.json()["headers"]["x-ussy-handle"] == "alice" and auth_decisions() == before

        # signed out: the next request is sent to sign in
        r = await a.get(web.url("localhost", "/__ussycode/logout"))
        csrf = r.text.split("name=csrf value='")[1].split("'")[0]
        assert (await a.post(web.url("localhost", "/__ussycode/logout"), data={"csrf": csrf})).status_code == 200
        r = await a.get(web.url("grv.localhost"), headers=HTML)
        assert r.status_code == 302 and "/__ussycode/login" in r.headers["location"]


async def test_grants_over_https_with_curl(server_factory: Callable[..., Any], needs_vms: None,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a browser does, with the real curl over HTTPS (--tls internal, HTTP/2): sign in to a private VM,
    get the ``__Host-`` grant cookie, and the next requests are let through by Caddy with the identity."""
    monkeypatch.setattr(auth_endpoint, "REPLAY_TTL", 60.0)
    port = free_port()
    server = await server_factory(https_addr=f"127.0.0.1:{port}", tls="internal")
    caddy = server.app.https.caddy
    assert isinstance(caddy, ManagedCaddy)
    deadline = time.monotonic() + 20
    while not caddy.root_ca_path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    web = Web(server, port)
    carol = await server.register("carol")
    await web.new_vm(carol, "tlsgr")
    jar = tmp_path / "jar"
    vm_url = f"https://tlsgr.localhost:{port}/page"
    curl = ["curl", "-sS", "--cacert", str(caddy.root_ca_path), "-b", str(jar), "-c", str(jar),
            "--resolve", f"tlsgr.localhost:{port}:127.0.0.1", "--resolve", f"localhost:{port}:127.0.0.1"]
    # the VM's URL sends the browser to sign in (which remembers where it was going)
    rc, out, err = await run(*curl, "-L", "-H", "Accept: text/html", "-o", "/dev/null", "-w", "%{url_effective}",
                             vm_url)
    assert rc == 0 and "/__ussycode/login?next=" in out, (out, err)
    login = (await web.login_url(carol)).replace("http://", "https://")
    # the sign-in link, the hand-off to the VM's host, then the page (forward-auth, which sets the grant)
    rc, out, err = await run(*curl, "-L", "-H", "Accept: text/html", login)
    assert rc == 0 and '"x-ussy-handle": "carol"' in out, (out, err)
    cookies = jar.read_text()
    assert "__Host-ussy_grant" in cookies and "__Host-ussy_session" in cookies, cookies
    before = auth_decisions()
    for _ in range(5):
        rc, out, err = await run(*curl, "--http2", "-w", "\n%{http_version}", vm_url)
        body, _, version = out.rpartition("\n")
        assert rc == 0 and version == "2", (out, err)
        assert '"x-ussy-handle": "carol"' in body and '"x-ussy-access": "owner"' in body and "ussy_" not in body
    assert auth_decisions() == before
    assert os.stat(server.app.https.routes.grants.root).st_mode & 0o777 == 0o711

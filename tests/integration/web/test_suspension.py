"""Suspension end to end through the front door: a real VM, its public URL, a token, the lobby, ssh vm@host."""

from __future__ import annotations

import json

import pytest

from .conftest import browser_client

pytestmark = pytest.mark.asyncio


async def test_suspension_end_to_end_with_a_real_vm(web, needs_vms: None) -> None:
    server = web.server
    admin = await server.register("root1")
    bob = await server.register("bob")
    await web.new_vm(bob, "bobvm")
    assert (await web.cmd(bob, "share", "set-public", "bobvm")).exit_status == 0
    token = json.loads((await web.cmd(bob, "token", "create", "--json")).stdout)["token"]
    api = f"http://localhost:{web.port}/exec"
    async with browser_client() as c:
        assert (await c.get(web.url("bobvm.localhost"))).status_code == 200
        r = await c.post(api, content="whoami --json", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["exit_code"] == 0

        r = await server.ssh(admin, "admin", "suspend", "bob", "--reason='spam runs'", "--json")
        assert r.exit_status == 0, r
        # the VM is stopped, its public URL answers "suspended" to anyone, in HTML and JSON
        vms = json.loads((await server.ssh(admin, "admin", "vms", "--owner=bob", "--json")).stdout)["vms"]
        assert [v["status"] for v in vms] == ["stopped"]
        page = await c.get(web.url("bobvm.localhost"), headers={"Accept": "text/html"})
        assert page.status_code == 403 and "suspended" in page.text
        assert (await c.get(web.url("bobvm.localhost"))).json()["reason"] == "suspended"
        # the token answers suspended; the lobby says so and offers nothing else; ssh vm@host does not get in
        r = await c.post(api, content="whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403 and "suspended" in r.json()["error"]
        r = await server.ssh(bob, "whoami")
        assert r.exit_status == 1 and "suspended (spam runs)" in r.stderr and not r.stdout
        r = await server.ssh(bob, "uname", user="bobvm")
        assert r.exit_status != 0 and "suspended" in r.stderr
        # an operator cannot start a suspended user's VM behind the suspension
        r = await server.ssh(admin, "admin", "user", "bob", "--json")
        assert json.loads(r.stdout)["suspended"] is True

        assert (await server.ssh(admin, "admin", "unsuspend", "bob")).exit_status == 0
        # access is back; the VM stays stopped until started
        assert (await server.ssh(bob, "whoami")).exit_status == 0
        r = await c.post(api, content="whoami --json", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["exit_code"] == 0
        stopped = await c.get(web.url("bobvm.localhost"))
        assert stopped.status_code == 503 and stopped.json()["reason"] == "vm_stopped"
        assert (await server.ssh(bob, "start", "bobvm")).exit_status == 0
        await web.serve_echo(bob, "bobvm", 8080)
        assert (await c.get(web.url("bobvm.localhost"))).status_code == 200

"""Registration over real SSH clients: limits per source address and overall, closed mode and 'admin add-user'.

Different client addresses come from binding the client to 127.0.0.2, 127.0.0.3, … (all of 127.0.0.0/8 is loopback).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ussycode.store import audit

pytestmark = pytest.mark.asyncio

RETRY = r"retry in \d+ minutes?"


async def handles(server: Any) -> set[str]:
    with server.app.services.store.engine.connect() as c:
        return {row[0] for row in c.execute(sa.text("select handle from users"))}


async def key_count(server: Any) -> int:
    with server.app.services.store.engine.connect() as c:
        return int(c.execute(sa.text("select count(*) from ssh_keys")).scalar_one())


async def registered_audit(server: Any, action: str = "user.register") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await server.app.services.store.read(lambda c: audit.recent(c, 1000, action))
    return rows


def pub(key: Path) -> str:
    return Path(f"{key}.pub").read_text().strip()


async def test_default_limit_is_five_per_address_then_refused_other_addresses_unaffected(server) -> None:
    for i in range(5):
        r = await server.ssh(server.key(f"burst{i}"), "register", f"burst{i}", bind="127.0.0.2")
        assert r.exit_status == 0, r
    r = await server.ssh(server.key("burst5"), "register", "burst5", bind="127.0.0.2")
    assert r.exit_status == 1, r
    assert re.fullmatch(rf"error: too many new accounts from your address; {RETRY}\n", r.stderr), r.stderr
    # the interactive prompt from that address refuses before asking for a handle
    conn = await server.connect(server.key("burst6"), bind="127.0.0.2")
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        out = await asyncio.wait_for(proc.stdout.read(), 10)
        await asyncio.wait_for(proc.wait(), 10)
        assert "too many new accounts from your address" in out and "handle:" not in out
        assert proc.exit_status == 1
    # another address is not affected, one-shot or interactive
    assert (await server.ssh(server.key("elsewhere"), "register", "elsewhere", bind="127.0.0.3")).exit_status == 0
    conn = await server.connect(server.key("typist"), bind="127.0.0.4")
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        await asyncio.wait_for(proc.stdout.readuntil("handle: "), 10)
        proc.stdin.write("typist\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        assert "welcome, typist" in out
        proc.stdin.write("exit\r")
        await asyncio.wait_for(proc.wait(), 10)
    # nothing was written for the refused attempts
    assert await handles(server) == {f"burst{i}" for i in range(5)} | {"elsewhere", "typist"}
    assert await key_count(server) == 7
    assert {r["target"] for r in await registered_audit(server)} == await handles(server)


async def test_taken_or_invalid_handles_do_not_use_up_the_limit(server_factory) -> None:
    server = await server_factory(registrations_per_address=2, registrations_per_hour=100)
    assert (await server.ssh(server.key("first"), "register", "first", bind="127.0.0.5")).exit_status == 0
    late = server.key("late")
    for _ in range(4):
        r = await server.ssh(late, "register", "first", bind="127.0.0.5")
        assert r.exit_status == 1 and "taken" in r.stderr, r
        r = await server.ssh(late, "register", "Not_Valid", bind="127.0.0.5")
        assert r.exit_status == 1 and "invalid handle" in r.stderr, r
    assert (await server.ssh(late, "register", "late", bind="127.0.0.5")).exit_status == 0
    r = await server.ssh(server.key("third"), "register", "third", bind="127.0.0.5")
    assert r.exit_status == 1 and "too many new accounts from your address" in r.stderr, r
    assert await handles(server) == {"first", "late"}


async def test_global_limit_across_addresses(server_factory) -> None:
    server = await server_factory(registrations_per_address=10, registrations_per_hour=3)
    for i in range(3):
        r = await server.ssh(server.key(f"g{i}x"), "register", f"g{i}x", bind=f"127.0.1.{i + 1}")
        assert r.exit_status == 0, r
    for i in range(3, 6):  # fresh addresses, each under its own limit: the server-wide limit refuses them
        r = await server.ssh(server.key(f"g{i}x"), "register", f"g{i}x", bind=f"127.0.1.{i + 1}")
        assert r.exit_status == 1, r
        assert re.fullmatch(rf"error: this server is taking too many new accounts right now; {RETRY}\n",
                            r.stderr), r.stderr
    assert await handles(server) == {"g0x", "g1x", "g2x"}
    assert len(await registered_audit(server)) == 3
    # registered users are not affected
    assert (await server.ssh(server.key("g0x"), "whoami")).exit_status == 0


async def test_closed_registration_and_admin_add_user(server_factory) -> None:
    server = await server_factory(registration="closed")
    # the first account of an empty database may still register: it is the admin who adds everyone else
    admin = server.key("boss")
    r = await server.ssh(admin, "register", "boss")
    assert r.exit_status == 0 and "trust level: admin" in r.stdout, r
    bob = server.key("bob")
    r = await server.ssh(bob, "register", "bob", bind="127.0.0.9")
    assert r.exit_status == 1
    assert r.stderr.startswith("error: registration is closed on this server: ask an admin to add your key"), r
    r = await server.ssh(bob, "whoami")
    assert r.exit_status == 1 and "registration is closed" in r.stderr, r
    conn = await server.connect(bob)
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        out = await asyncio.wait_for(proc.stdout.read(), 10)
        await asyncio.wait_for(proc.wait(), 10)
        assert "registration is closed" in out and "handle:" not in out and proc.exit_status == 1
    assert await handles(server) == {"boss"}

    # the admin adds bob with his public key line
    r = await server.ssh(admin, "admin", "add-user", "bob", shlex.quote(pub(bob)))
    assert r.exit_status == 0 and "added bob (newbie)" in r.stdout, r
    me = json.loads((await server.ssh(bob, "whoami", "--json")).stdout)
    assert me["handle"] == "bob" and me["trust_level"] == "newbie"
    added = await registered_audit(server, "user.add")
    assert len(added) == 1 and added[0]["target"] == "bob"
    boss_id = (await server.app.services.users.by_handle("boss")).id
    assert added[0]["actor_id"] == boss_id
    # taken handles, keys already in use, bad keys and hostile handles are refused, with nothing written
    carol = server.key("carol")
    for args, status, message in [
        (["bob", shlex.quote(pub(carol))], 1, "taken"),
        (["carol", shlex.quote(pub(bob))], 1, "already registered"),
        (["carol", "ssh-ed25519", "AAAAnotbase64"], 2, "not a valid public key"),
        ([shlex.quote("car\x1bol"), shlex.quote(pub(carol))], 2, "the handle may contain printable characters only"),
        (["carol", shlex.quote(pub(carol) + " \u202egnp.exe")], 2, "the key comment may contain printable"),
    ]:
        r = await server.ssh(admin, "admin", "add-user", *args)
        assert r.exit_status == status and message in r.stderr, (args, r)
    # a non-admin can neither run nor see the admin command
    r = await server.ssh(bob, "admin", "add-user", "carol", shlex.quote(pub(carol)))
    assert r.exit_status == 1 and "for the operators and admins" in r.stderr, r
    assert "the audit log" not in (await server.ssh(bob, "help")).stdout
    assert "the audit log" in (await server.ssh(admin, "help")).stdout
    assert await handles(server) == {"boss", "bob"}
    assert await key_count(server) == 2

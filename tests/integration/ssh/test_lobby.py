"""The lobby through real SSH clients: registration, commands, exit statuses, hostile input."""

from __future__ import annotations

import asyncio
import json
import time

import asyncssh
import pytest
import sqlalchemy as sa

from ussycode.store import audit

pytestmark = pytest.mark.asyncio


async def test_register_then_whoami(server) -> None:
    key = server.key("demo")
    r = await server.ssh(key, "whoami")
    assert r.exit_status == 1
    assert "error: unregistered key; run 'register <handle>'" in r.stderr
    r = await server.ssh(key, "register", "demo")
    assert r.exit_status == 0, r
    r = await server.ssh(key, "whoami", "--json")
    assert r.exit_status == 0, r
    me = json.loads(r.stdout)
    assert set(me) == {"handle", "trust_level", "fingerprints", "vm_count", "quota", "created_at", "email",
                       "email_verified", "tutorial"}
    assert me["tutorial"] == {"done": 0, "lessons": 10}
    assert me["handle"] == "demo" and me["trust_level"] == "admin" and me["vm_count"] == 0
    assert me["fingerprints"][0].startswith("SHA256:")
    assert set(me["quota"]) == {"vms", "cpu", "memory_mb", "disk_gb"}
    # the second account is a newbie with the newbie quota
    key2 = server.key("second")
    assert (await server.ssh(key2, "register", "second")).exit_status == 0
    me2 = json.loads((await server.ssh(key2, "whoami", "--json")).stdout)
    assert me2["trust_level"] == "newbie" and me2["quota"] == {"vms": 3, "cpu": 1, "memory_mb": 2048, "disk_gb": 5}
    # registering again, a taken handle, a bad handle
    assert "already registered as demo" in (await server.ssh(key, "register", "other")).stderr
    key3 = server.key("third")
    r = await server.ssh(key3, "register", "demo")
    assert r.exit_status == 1 and "taken" in r.stderr
    r = await server.ssh(key3, "register", "Bad_Handle!")
    assert r.exit_status == 1 and "invalid handle" in r.stderr
    r = await server.ssh(key3, "register")
    assert r.exit_status == 2
    rows = await server.app.services.store.read(lambda c: audit.recent(c, action="user.register"))
    assert {r["target"] for r in rows} == {"demo", "second"}


async def test_exit_statuses_and_quoting(server) -> None:
    key = await server.register("quoter")
    r = await server.ssh(key, "nonsense")
    assert r.exit_status == 2 and "unknown command" in r.stderr
    r = await server.ssh(key, "new --name='unbalanced")
    assert r.exit_status == 2 and "check your quotes" in r.stderr
    r = await server.ssh(key, "new", "--cpu=lots")
    assert r.exit_status == 2 and "usage: new" in r.stderr
    r = await server.ssh(key, "start", "nosuchvm")
    assert r.exit_status == 1 and r.stderr.startswith("error: no VM named")
    r = await server.ssh(key, "help", "'ls'")
    assert r.exit_status == 0 and "usage: ls" in r.stdout
    r = await server.ssh(key, "new", "--name=Bad_Name")
    assert r.exit_status == 2 and "invalid VM name" in r.stderr
    r = await server.ssh(key, "rm", "x1x", "--yes")
    assert r.exit_status == 1
    r = await server.ssh(key, "ls", "--json")
    assert r.exit_status == 0 and json.loads(r.stdout) == []
    r = await server.ssh(key, "help")
    assert r.exit_status == 0 and "new" in r.stdout and "ssh-key" in r.stdout


async def test_listing_commands_print_only_json(server) -> None:
    key = await server.register("jsonly")
    for cmd in (["ls", "--json"], ["whoami", "--json"], ["ssh-key", "list", "--json"]):
        r = await server.ssh(key, *cmd)
        assert r.exit_status == 0, r
        json.loads(r.stdout)


async def test_ssh_keys(server) -> None:
    key = await server.register("keys")
    other = server.key("keys-laptop")
    pub = (other.parent / (other.name + ".pub")).read_text().strip()
    r = await server.ssh(key, "ssh-key", "add", f"'{pub}'")
    assert r.exit_status == 0, r
    # the new key logs in as the same user
    me = json.loads((await server.ssh(other, "whoami", "--json")).stdout)
    assert me["handle"] == "keys" and len(me["fingerprints"]) == 2
    keys = json.loads((await server.ssh(key, "ssh-key", "list", "--json")).stdout)
    assert [k["comment"] for k in keys] == ["", "keys-laptop"]  # a key that logged in carries no comment
    assert (await server.ssh(key, "ssh-key", "rename", str(keys[1]["id"]), "work", "laptop")).exit_status == 0
    keys = json.loads((await server.ssh(key, "ssh-key", "list", "--json")).stdout)
    assert keys[1]["comment"] == "work laptop"
    # duplicates and garbage are refused
    assert (await server.ssh(key, "ssh-key", "add", f"'{pub}'")).exit_status == 1
    r = await server.ssh(key, "ssh-key", "add", "ssh-ed25519", "AAAAnotbase64!!")
    assert r.exit_status == 2 and "not a valid public key" in r.stderr
    # remove by fingerprint; the last key cannot go
    assert (await server.ssh(key, "ssh-key", "rm", keys[1]["fingerprint"])).exit_status == 0
    assert (await server.ssh(other, "whoami")).exit_status == 1  # that key is now unregistered
    r = await server.ssh(key, "ssh-key", "rm", str(keys[0]["id"]))
    assert r.exit_status == 1 and "last key" in r.stderr


async def test_password_and_keyboard_interactive_refused(server) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", server.port, username="lobby", password="hunter2", client_keys=None,
                               known_hosts=None, agent_path=None, config=[],
                               preferred_auth="password,keyboard-interactive")


async def test_unsupported_key_types_refused(server) -> None:
    weak = asyncssh.generate_private_key("ssh-rsa", key_size=1024)
    with pytest.raises(asyncssh.PermissionDenied):
        await server.connect(weak)
    r = await server.ssh(server.key("good"), "register", "good")
    assert r.exit_status == 0  # the server is still fine


async def test_interactive_registration_and_prompt(server) -> None:
    key = server.key("typist")
    conn = await server.connect(key)
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        out = await asyncio.wait_for(proc.stdout.readuntil("handle: "), 10)
        assert "pick a handle" in out
        proc.stdin.write("NOT valid\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("handle: "), 10)
        proc.stdin.write("typist\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        assert "welcome, typist" in out
        proc.stdin.write("whoami\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        assert "handle:       typist" in out
        proc.stdin.write("\x1b[A\r")  # history: up-arrow recalls whoami
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        assert "trust level:" in out
        proc.stdin.write("nonsense\r")
        out = await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        assert "unknown command" in out
        proc.stdin.write("exit\r")
        await asyncio.wait_for(proc.wait(), 10)
        assert proc.exit_status == 0


async def test_ctrl_d_leaves(server) -> None:
    key = await server.register("leaver")
    conn = await server.connect(key)
    async with conn:
        proc = await conn.create_process(term_type="xterm")
        await asyncio.wait_for(proc.stdout.readuntil("ussy> "), 10)
        proc.stdin.write("\x04")
        await asyncio.wait_for(proc.wait(), 10)
        assert proc.exit_status == 0


async def test_rm_without_yes_is_refused_non_interactively(server) -> None:
    key = await server.register("carefulness")
    r = await server.ssh(key, "rm", "somevm")
    assert r.exit_status == 1  # not found comes first for a VM that does not exist
    assert "no VM named" in r.stderr


async def test_hostile_input_keeps_the_server_up(server) -> None:
    key = await server.register("hostile")
    # binary garbage on stdin of a shell session without a PTY: every line is an error, the session ends at EOF
    r = await server.ssh(key, stdin=bytes(range(256)) * 64 + b"\nwhoami\n")
    assert "handle:       hostile" in r.stdout
    # a 1 MB argument
    conn = await server.connect(key)
    async with conn:
        try:
            res = await asyncio.wait_for(conn.run("new --name=" + "x" * 1_000_000), 30)
            assert res.exit_status != 0
        except (asyncssh.Error, ConnectionError):
            pass  # refusing the oversized packet is fine too
    r = await server.ssh(key, "tag", "box", "x" * 70_000)
    assert r.exit_status == 2 and "too long" in r.stderr
    # the server is still up and the DB intact
    r = await server.ssh(key, "whoami", "--json")
    assert r.exit_status == 0 and json.loads(r.stdout)["handle"] == "hostile"
    with server.app.services.store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


async def test_burst_of_100_connections_from_one_key(server) -> None:
    key = await server.register("burst")

    async def one() -> tuple[int, str]:
        try:
            async with await server.connect(key) as conn:
                res = await conn.run("whoami --json")
                return int(res.exit_status or 0), str(res.stderr)
        except (asyncssh.Error, OSError) as exc:
            return -1, repr(exc)

    results = await asyncio.gather(*(one() for _ in range(100)))
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert ok, results
    for status, err in refused:
        assert status == 1 and err.startswith("error: "), (status, err)
    limiter = server.app.services.limiter
    # Nothing refills while the clock stands still: the key is refused until its bucket refills.
    base = time.monotonic()
    limiter.clock = lambda: base
    for _ in range(int(limiter.burst) + 1):
        r = await server.ssh(key, "whoami")
        if r.exit_status == 1:
            break
    assert r.exit_status == 1 and r.stderr.startswith("error: rate limit exceeded"), r
    limiter.clock = lambda: base + 60.0  # a minute later the bucket is full again
    assert (await server.ssh(key, "whoami")).exit_status == 0
    with server.app.services.store.engine.connect() as c:
        assert c.execute(sa.text("select count(*) from users")).scalar() == 1

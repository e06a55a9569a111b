"""Operating through the lobby (OpenSSH) and ``/exec``: the role rules of CONTRACT §10, quotas, suspension,
the host-side ``ussycode admin`` commands and ``ussycode backup`` / ``restore``."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ussycode.runtime.fake import FakeRuntime

pytestmark = pytest.mark.asyncio


async def test_the_role_rules_hold_in_the_lobby(server) -> None:
    admin = await server.register("root1")  # the first account is the admin
    bob = await server.register("bob")
    carol = await server.register("carol")

    # a newbie neither sees nor runs admin commands
    assert "admin" not in (await server.ssh(bob, "help")).stdout
    r = await server.ssh(bob, "admin", "users")
    assert r.exit_status == 1 and "admin" in r.stderr
    # the admin lists users (JSON contract) and raises carol to operator
    users = json.loads((await server.ssh(admin, "admin", "users", "--json")).stdout)
    assert {u["handle"] for u in users["users"]} == {"root1", "bob", "carol"} and users["total"] == 3
    r = await server.ssh(admin, "admin", "set-trust", "carol", "operator")
    assert r.exit_status == 0, r
    # carol's next command already has the new tier, in the same kind of session
    assert "admin" in (await server.ssh(carol, "help")).stdout
    # an operator raises a newbie to citizen ...
    r = await server.ssh(carol, "admin", "set-trust", "bob", "citizen", "--json")
    assert r.exit_status == 0 and json.loads(r.stdout)["trust_level"] == "citizen", r
    assert json.loads((await server.ssh(bob, "whoami", "--json")).stdout)["trust_level"] == "citizen"
    # ... but cannot make anyone operator or admin, nor act on the admin, nor on themselves
    for args in (("set-trust", "bob", "admin"), ("set-trust", "bob", "operator"), ("suspend", "root1"),
                 ("set-trust", "carol", "admin"), ("quota", "root1", "--vms=1")):
        r = await server.ssh(carol, "admin", *args)
        assert r.exit_status == 1, (args, r)
        assert "only an admin" in r.stderr or "your own" in r.stderr, (args, r.stderr)
    assert json.loads((await server.ssh(bob, "whoami", "--json")).stdout)["trust_level"] == "citizen"
    # nobody changes their own tier; the last admin stays admin
    r = await server.ssh(admin, "admin", "set-trust", "root1", "newbie")
    assert r.exit_status == 1 and "your own" in r.stderr
    # every refusal and change is in the audit log, with the actor
    audit = json.loads((await server.ssh(admin, "admin", "audit", "--action=admin.", "--json")).stdout)
    actions = [(a["actor"], a["action"], a["target"]) for a in audit]
    assert ("carol", "admin.set_trust", "bob") in actions
    assert ("root1", "admin.set_trust", "carol") in actions
    assert ("carol", "admin.refused", "bob") in actions
    # bad input: unknown tier, unknown user, bad duration, hostile text
    for args, code in ((("set-trust", "bob", "king"), 2), (("set-trust", "nobody", "citizen"), 1),
                       (("audit", "--since=forever"), 2), (("users", "--search=\x1b[2J"), 2),
                       (("quota", "bob", "--vms=-3"), 2), (("users", "--page=0"), 2)):
        r = await server.ssh(admin, "admin", *args)
        assert r.exit_status == code, (args, r)
        assert r.stderr.startswith("error:"), (args, r.stderr)


async def test_quota_overrides_apply_to_new(server) -> None:
    admin = await server.register("root1")
    bob = await server.register("bob")
    r = await server.ssh(admin, "admin", "quota", "bob", "--vms=0", "--json")
    assert r.exit_status == 0, r
    assert json.loads(r.stdout)["quota"]["vms"] == 0
    assert json.loads((await server.ssh(bob, "whoami", "--json")).stdout)["quota"]["vms"] == 0
    r = await server.ssh(bob, "new", "--name=nope")
    assert r.exit_status == 1 and "VM limit reached" in r.stderr and "your quota" in r.stderr
    r = await server.ssh(admin, "admin", "quota", "bob", "--reset", "--json")
    assert json.loads(r.stdout)["quota"] == {"vms": 3, "cpu": 1, "memory_mb": 2048, "disk_gb": 5}


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ussycode.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120, check=False)


async def test_host_commands_promote_and_list_while_the_server_runs(server) -> None:
    await server.register("root1")
    bob = await server.register("bob")
    r = await asyncio.to_thread(_cli, server.data_dir, "admin", "promote", "bob", "--tier=operator")
    assert r.returncode == 0, r.stderr
    assert "admin" in (await server.ssh(bob, "help")).stdout  # the running server sees it at the next command
    listed = json.loads((await asyncio.to_thread(_cli, server.data_dir, "admin", "list", "--json")).stdout)
    assert {(u["handle"], u["trust_level"]) for u in listed} == {("root1", "admin"), ("bob", "operator")}
    r = await asyncio.to_thread(_cli, server.data_dir, "admin", "promote", "nobody")
    assert r.returncode == 1 and "no user" in r.stderr


async def test_backup_during_concurrent_news_restores_to_a_sound_database(server_factory, tmp_path: Path,
                                                                          test_image: object) -> None:
    fake = FakeRuntime()  # the control plane and the database are under test here, not VM boots
    server = await server_factory(runtime=fake)
    admin = await server.register("root1")
    backup = tmp_path / "backups" / "db.sqlite"

    async def news() -> list[int]:
        results = await asyncio.gather(*(server.ssh(admin, "new", f"--name=box{i:02d}") for i in range(20)))
        return [r.exit_status for r in results]

    statuses, took = await asyncio.gather(news(), asyncio.to_thread(_cli, server.data_dir, "backup",
                                                                    "--to", str(backup)))
    assert took.returncode == 0, took.stderr
    assert all(s == 0 for s in statuses), statuses
    assert backup.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(backup) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        copied = db.execute("SELECT count(*) FROM vms").fetchone()[0]
    assert 0 <= copied <= 20
    # restore refuses while the server runs, and works once it is stopped
    r = await asyncio.to_thread(_cli, server.data_dir, "restore", str(backup))
    assert r.returncode == 1 and "stop it" in r.stderr
    await server.app.stop()
    r = await asyncio.to_thread(_cli, server.data_dir, "restore", str(backup))
    assert r.returncode == 0, r.stderr
    again = await server_factory(server.data_dir, runtime=FakeRuntime(fake.host))
    listing = json.loads((await again.ssh(admin, "ls", "--json")).stdout)
    assert len(listing) == copied
    # a file that is not a database is refused and loses nothing
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    await again.app.stop()
    r = await asyncio.to_thread(_cli, server.data_dir, "restore", str(junk))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not a sound SQLite database" in r.stderr
    third = await server_factory(server.data_dir, runtime=FakeRuntime(fake.host))
    assert len(json.loads((await third.ssh(admin, "ls", "--json")).stdout)) == copied


async def test_the_same_rules_hold_through_exec(server) -> None:
    """The API obeys the policy the lobby does: an operator's token cannot grant admin; a newbie's cannot list."""
    admin = await server.register("root1")
    op = await server.register("oper")
    newbie = await server.register("nina")
    assert (await server.ssh(admin, "admin", "set-trust", "oper", "operator")).exit_status == 0
    tokens = {}
    for name, key in (("oper", op), ("nina", newbie)):
        tokens[name] = json.loads((await server.ssh(key, "token", "create", "--json")).stdout)["token"]
    base = f"http://127.0.0.1:{server.app.http_port}/exec"
    async with httpx.AsyncClient(timeout=30) as c:
        async def run(who: str, line: str) -> dict[str, object]:
            r = await c.post(base, content=line, headers={"Authorization": f"Bearer {tokens[who]}"})
            assert r.status_code == 200, r.text
            return dict(r.json())

        out = await run("oper", "admin set-trust nina admin")
        assert out["exit_code"] == 1 and "only an admin can grant admin" in str(out["error"])
        out = await run("oper", "admin set-trust nina citizen --json")
        assert out["exit_code"] == 0 and json.loads(str(out["output"]))["trust_level"] == "citizen"
        out = await run("nina", "admin users --json")
        assert out["exit_code"] == 1 and "admin" in str(out["error"])
        # suspension applies to the suspended user's token at once (no cache outlives it)
        assert (await server.ssh(admin, "admin", "suspend", "nina")).exit_status == 0
        r = await c.post(base, content="whoami", headers={"Authorization": f"Bearer {tokens['nina']}"})
        assert r.status_code == 403 and "suspended" in r.json()["error"]

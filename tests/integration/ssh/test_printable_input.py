"""Hostile text in every field a user sets, through the real lobby: refused with an error naming the field, the
character shown by its code point (never echoed raw), and nothing stored."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ussycode.runtime.container import ContainerRuntime

pytestmark = pytest.mark.asyncio

# (text, what the error says about it)
HOSTILE = [
    ("\x1b[2J\x1b[31mred", "U+001B"),
    ("a\rb", "U+000D"),
    ("a\nb", "U+000A"),
    ("a\tb", "U+0009"),
    ("a\x85b", "U+0085"),
    ("a\x9b2Jb", "U+009B"),
    ("a\x7fb", "U+007F"),
    ("ab\u202egnp.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("a\u2066b", "U+2066"),
    ("a\u200bb", "U+200B"),
    ("a\u2028b", "U+2028"),
]
LONG = "x" * 10_240
TABLES = ("users", "ssh_keys", "vms", "vm_tags", "vm_shares", "audit_log")


def counts(server: Any) -> dict[str, int]:
    with server.app.services.store.engine.connect() as c:
        return {t: int(c.execute(sa.text(f"select count(*) from {t}")).scalar_one()) for t in TABLES}  # noqa: S608


def all_text(server: Any) -> str:
    """Every stored value of the tables a user writes, as one string."""
    with server.app.services.store.engine.connect() as c:
        return json.dumps([[list(map(str, row)) for row in c.execute(sa.text(f"select * from {t}"))]  # noqa: S608
                           for t in TABLES], ensure_ascii=False)


async def run(conn: Any, *argv: str) -> Any:
    """One command with these exact arguments (quoted like a shell would), over an open asyncssh connection."""
    return await asyncio.wait_for(conn.run(shlex.join(argv)), 30)


def assert_refused(res: Any, field: str, what: str) -> None:
    assert res.exit_status == 2, (field, res.exit_status, res.stdout, res.stderr)
    err = str(res.stderr)
    assert err.startswith(f"error: the {field} may contain printable characters only; character "), err
    assert what in err, err
    assert all(ch.isprintable() or ch == "\n" for ch in err), repr(err)  # the hostile text is not echoed


def assert_too_long(res: Any, field: str, limit: int) -> None:
    assert res.exit_status == 2, (field, res.stdout, res.stderr)
    assert res.stderr.startswith(f"error: the {field} is too long (") and f"at most {limit})" in res.stderr, res


async def test_hostile_text_refused_in_every_field(server_factory) -> None:
    server = await server_factory(rate_per_minute=100_000, rate_burst=100_000)  # ~120 commands in a row
    key = await server.register("careful")
    other = server.key("careful-laptop")
    pub = Path(f"{other}.pub").read_text().split()
    key_line = f"{pub[0]} {pub[1]}"
    before = counts(server)
    conn = await server.connect(key)
    async with conn:
        key_id = str(json.loads((await run(conn, "ssh-key", "list", "--json")).stdout)[0]["id"])
        for text, what in HOSTILE:
            assert_refused(await run(conn, "ssh-key", "add", f"{key_line} {text}"), "key comment", what)
            assert_refused(await run(conn, "ssh-key", "rename", key_id, text), "key comment", what)
            assert_refused(await run(conn, "new", f"--name={text}"), "VM name", what)
            assert_refused(await run(conn, "new", "--name=box1", f"--image={text}"), "image name", what)
            assert_refused(await run(conn, "new", "--name=box1", "--env", f"GREETING={text}"),
                           "value of --env GREETING", what)
            assert_refused(await run(conn, "rename", "box1", text), "VM name", what)
            assert_refused(await run(conn, "tag", "box1", text), "tag", what)
            assert_refused(await run(conn, "share", "add", "box1", f"bob{text}@example.org"),
                           "handle or e-mail address", what)
            assert_refused(await run(conn, "share", "add", "box1", text), "handle or e-mail address", what)
        # 10 KB strings: too long, said plainly
        assert_too_long(await run(conn, "ssh-key", "add", f"{key_line} {LONG}"), "key comment", 200)
        assert_too_long(await run(conn, "ssh-key", "rename", key_id, LONG), "key comment", 200)
        assert_too_long(await run(conn, "new", f"--name={LONG}"), "VM name", 30)
        assert_too_long(await run(conn, "tag", "box1", LONG), "tag", 40)
        assert_too_long(await run(conn, "share", "add", "box1", f"{LONG}@example.org"), "handle or e-mail address",
                        254)
        # a NUL byte never gets past the command line
        res = await run(conn, "ssh-key", "rename", key_id, "a\x00b")
        assert res.exit_status == 2 and "NUL" in res.stderr
        # trailing newlines used to slip through the name and tag patterns ('$' matches before a final '\n')
        assert_refused(await run(conn, "new", "--name=box1\n"), "VM name", "U+000A")
        assert_refused(await run(conn, "tag", "box1", "prod\n"), "tag", "U+000A")
        # strict e-mail addresses
        for bad in ("bob@localhost", "bob@@example.org", '"bob"@example.org', "bob@exa_mple.org", "bö@example.org",
                    "bob@example.org.", "bob..x@example.org"):
            res = await run(conn, "share", "add", "box1", bad)
            if bad == "bob@example.org.":  # a trailing dot is the same domain: accepted, the VM does not exist
                assert res.exit_status == 1 and "no VM named" in res.stderr, res
                continue
            assert res.exit_status == 2 and res.stderr.startswith("error: invalid e-mail address"), (bad, res)
        # printable non-ASCII text is fine where the field allows it
        res = await run(conn, "ssh-key", "rename", key_id, "Zoë's laptop 🎉")
        assert res.exit_status == 0, res
        keys = json.loads((await run(conn, "ssh-key", "list", "--json")).stdout)
        assert keys[0]["comment"] == "Zoë's laptop 🎉"
    after = counts(server)
    assert after == {**before, "audit_log": before["audit_log"] + 1}, (before, after)  # the one good rename
    stored = all_text(server)
    for text, _ in HOSTILE:
        assert text not in stored


async def test_hostile_handles_at_registration(server) -> None:
    for i, (text, what) in enumerate(HOSTILE):
        key = server.key(f"newcomer{i}")
        r = await server.ssh(key, "register", shlex.quote(f"bob{text}"))
        assert r.exit_status == 1, r
        assert r.stderr.startswith("error: the handle may contain printable characters only") and what in r.stderr
    r = await server.ssh(server.key("longname"), "register", LONG)
    assert r.exit_status == 1 and "the handle is too long" in r.stderr
    # at the handle prompt without a terminal (with one, the terminal line editor already drops such characters)
    lines = ["bob\x1b[2J", "bob\x00", "bo\rb", "bob\u202e"]  # four of the five tries
    r = await server.ssh(server.key("typist"), stdin=("\n".join([*lines, "typist", "whoami"]) + "\n").encode())
    assert r.stderr.count("error: the handle may contain printable characters only") == len(lines), r
    for what in ("U+001B", "U+0000", "U+000D", "U+202E"):
        assert what in r.stderr
    assert "welcome, typist" in r.stdout and "handle:       typist" in r.stdout
    with server.app.services.store.engine.connect() as c:
        assert [row[0] for row in c.execute(sa.text("select handle from users"))] == ["typist"]


@pytest.mark.slow
async def test_hostile_text_on_a_real_vm(server_factory, test_image: object) -> None:
    """With a VM that exists, tag, rename, cp and share add still refuse hostile text and store nothing."""
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")
    server = await server_factory(rate_per_minute=100_000, rate_burst=100_000)
    key = await server.register("vmowner")
    assert (await server.ssh(key, "new", "--name=plain1", "--disk=1", "--json")).exit_status == 0
    before = counts(server)
    conn = await server.connect(key)
    async with conn:
        for text, what in HOSTILE:
            assert_refused(await run(conn, "tag", "plain1", text), "tag", what)
            assert_refused(await run(conn, "rename", "plain1", f"new{text}"), "VM name", what)
            assert_refused(await run(conn, "cp", "plain1", f"copy{text}"), "VM name", what)
            assert_refused(await run(conn, "share", "add", "plain1", f"bob{text}@example.org"),
                           "handle or e-mail address", what)
        # a good international address is stored in its ASCII (IDNA) form
        res = await run(conn, "share", "add", "plain1", "Zoe@Bücher.example")
        assert res.exit_status == 0, res
        shown = json.loads((await run(conn, "share", "show", "plain1", "--json")).stdout)
        assert shown["users"] == ["zoe@xn--bcher-kva.example"], shown
        assert (await run(conn, "share", "remove", "plain1", "zoe@bücher.example")).exit_status == 0
        assert (await run(conn, "rm", "plain1", "--yes")).exit_status == 0
    assert counts(server)["vm_tags"] == before["vm_tags"]

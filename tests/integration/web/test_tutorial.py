"""The tutorial with a real VM: lessons pass only when real state says so (and fail before), the interactive
prompt (check, hint, skip, quit, lobby commands inside it), progress in whoami, and status re-checked."""

from __future__ import annotations

import json

import pytest

from ussycode.auth.identity import Actor

from .conftest import browser_client

pytestmark = pytest.mark.asyncio


async def status(s, key) -> dict[int, bool]:  # type: ignore[no-untyped-def]
    rows = json.loads((await s.ssh(key, "tutorial", "status", "--json")).stdout)
    return {r["lesson"]: r["done"] for r in rows}


async def current(s, key) -> str:  # type: ignore[no-untyped-def]
    return (await s.ssh(key, "tutorial")).stdout


async def test_lessons_follow_real_state(web, needs_vms: None) -> None:
    s = web.server
    key = await s.register("learner")
    out = await current(s, key)
    assert "Lesson 1 of 10" in out and "new --name=learner-tut" in out and "not yet" in out
    assert (await status(s, key)) == {n: False for n in range(1, 11)}

    # 1: the VM runs (typing about it does nothing; making it does)
    assert (await s.ssh(key, "new", "--name=learner-tut", timeout=180)).exit_status == 0
    assert "done: it is running" in await current(s, key)
    # 2: a file in the VM
    assert "not yet" in await current(s, key)
    assert (await s.ssh(key, "echo hello > ~/hello.txt", user="learner-tut")).exit_status == 0
    assert "done" in await current(s, key)
    # 3: port 8080 answers HTTP
    assert "nothing answers" in await current(s, key)
    await web.serve_echo(key, "learner-tut", 8080)
    assert "answers HTTP/1.0 200" in await current(s, key)
    # 4: a browser session on the VM's host
    assert "no browser" in await current(s, key)
    services = s.app.services
    me = await services.users.by_handle("learner")
    vm = await services.vms.by_name("learner-tut")
    token = await services.sessions.create_login_token(Actor(me, "ssh"))
    parent = await services.sessions.redeem_login_token(token, "localhost")
    code = await services.sessions.create_handoff(parent[1], "learner-tut.localhost", vm.id)
    assert await services.sessions.redeem_handoff(code, "learner-tut.localhost", vm.id) is not None
    assert "done: a browser has opened" in await current(s, key)
    # 5 and 6 need apt and git (the full image): skipped here, and they do not pass by themselves
    out = await current(s, key)
    assert "Lesson 5" in out and "cowsay is not installed" in out
    assert "skipped lesson 5" in (await s.ssh(key, "tutorial", "skip")).stdout
    assert "no commit" in await current(s, key)
    assert (await s.ssh(key, "tutorial", "skip")).exit_status == 0
    # 7: public and a link — one is not enough
    assert (await s.ssh(key, "share", "set-public", "learner-tut")).exit_status == 0
    assert "still missing: a share link" in await current(s, key)
    assert (await s.ssh(key, "share", "add-link", "learner-tut")).exit_status == 0
    assert "done: public, with a share link" in await current(s, key)
    # 8: the LLM gateway: not used, skipped
    assert "no LLM request" in await current(s, key)
    assert (await s.ssh(key, "tutorial", "skip")).exit_status == 0
    # 9: a token used through /exec
    tok = json.loads((await s.ssh(key, "token", "create", "--json")).stdout)["token"]
    assert "no token has been used" in await current(s, key)
    async with browser_client() as c:
        r = await c.post(web.url("localhost", "/exec"), content="whoami", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 200
    assert "done: a token has been used" in await current(s, key)
    # 10: clean up
    assert "still exists" in await current(s, key)
    assert (await s.ssh(key, "rm", "learner-tut", "--yes")).exit_status == 0
    assert "done: the tutorial VM is gone" in await current(s, key)
    assert "finished the tutorial" in await current(s, key)
    done = await status(s, key)
    assert [n for n, ok in done.items() if ok] == [1, 2, 3, 4, 7, 9, 10]
    me_json = json.loads((await s.ssh(key, "whoami", "--json")).stdout)
    assert me_json["tutorial"] == {"done": 7, "lessons": 10}

    # the interactive prompt: hint, a lobby command inside it, check, quit; --reset starts over
    async with await s.connect(key) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30))
        proc.stdin.write("tutorial --reset\nhint\nls\n\nquit\nexit\n")
        out = await proc.stdout.read()
    assert "Lesson 1 of 10" in out and "Type `new --name=learner-tut`" in out
    assert "no VMs yet" in out and "not yet: there is no VM" in out and "left the tutorial" in out
    assert (await status(s, key))[2] is False
    for bad in (("--lesson=99",), ("nonsense",), ("--lesson=abc",)):
        r = await s.ssh(key, "tutorial", *bad)
        assert r.exit_status in (1, 2) and r.stderr.startswith("error:"), (bad, r)

"""``new --command`` and ``new --prompt`` in a real VM: the command runs once as the VM's user with its log, the
agent run reports how it ended to the metadata service and ``ls --json`` shows it. (The test image has no agent
binaries, so the agent run ends "failed" with the reason in its log: the machinery is what is under test here;
the real pi and opencode run in the full image.)"""

from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.asyncio


async def wait_for(check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.5)


async def test_command_and_prompt_after_boot(web, needs_vms: None) -> None:
    s = web.server
    key = await s.register("maker")
    r = await s.ssh(key, "new", "--name=made", "--agent=pi", "--command='echo made by $(id -un) > ~/proof'",
                    "--prompt='write a hello page and serve it on 8080'", "--json", timeout=180)
    assert r.exit_status == 0, r
    assert json.loads(r.stdout)["agent"] == {"name": "pi", "state": "running"}

    async def proof() -> str:
        out = await s.ssh(key, "cat ~/proof 2>/dev/null", user="made")
        return out.stdout.strip()

    assert await wait_for(proof) == "made by ussycode"

    async def finished() -> dict[str, str] | None:
        listing = json.loads((await s.ssh(key, "ls", "--json")).stdout)
        agent = next(v for v in listing if v["name"] == "made").get("agent")
        return agent if agent and agent["state"] != "running" else None

    assert await wait_for(finished) == {"name": "pi", "state": "failed"}
    log = (await s.ssh(key, "cat ~/.ussycode/agent.log", user="made")).stdout
    assert "pi is not installed in this image" in log
    # the login environment names the agent an interactive login starts
    assert "USSYCODE_AGENT=pi" in (await s.ssh(key, "bash -lc env", user="made")).stdout

    # bad input: an agent run needs an agent; control characters are refused; nothing is created
    for args in (("--agent=none", "--prompt=x"), ("--prompt='a\x1bb'",), ("--agent=robot",)):
        r = await s.ssh(key, "new", "--name=nope", *args)
        assert r.exit_status == 2 and r.stderr.startswith("error:"), (args, r)
    assert "nope" not in (await s.ssh(key, "ls")).stdout

    # a VM reports only on its own run; garbage is refused
    other = await s.ssh(key, "new", "--name=plain", "--json", timeout=180)
    assert other.exit_status == 0
    async def post(vm: str, body: bytes) -> str:
        script = (b"import sys, urllib.request as u, urllib.error as e\n"
                  b"try:\n u.urlopen(u.Request('http://169.254.169.254/agent/state', data=sys.stdin.buffer.read(),"
                  b" headers={'Content-Type': 'application/json'})); print(200)\n"
                  b"except e.HTTPError as x:\n print(x.code)\n")
        await s.ssh(key, "cat > /tmp/post.py", user=vm, stdin=script)
        await s.ssh(key, "cat > /tmp/body", user=vm, stdin=body)
        r = await s.ssh(key, "python3 /tmp/post.py < /tmp/body", user=vm)
        return r.stdout.strip()

    assert await post("plain", b'{"state": "done"}') == "404"
    assert await post("made", b'{"state": "won"}') == "400"
    assert await post("made", b"[1, 2]") == "400"

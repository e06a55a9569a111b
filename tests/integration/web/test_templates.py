"""Templates with real VMs: the shipped list, a template's setup run once with its state in ls, its public port
answering through the front door, an operator's own template, and bad templates refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import agent_finished, browser_client, require_full_image, serve_local

pytestmark = pytest.mark.asyncio
SHIPPED = {"blank", "python-web", "node-web", "static-site", "agent-playground"}


async def test_templates_make_working_vms(web, needs_vms: None) -> None:
    s = web.server
    key = await s.register("builder")
    listed = json.loads((await s.ssh(key, "template", "list", "--json")).stdout)
    assert SHIPPED <= {t["name"] for t in listed}
    assert {t["name"]: t["has_setup"] for t in listed}["static-site"] is True

    # static-site: setup serves ~/site, the template makes port 8080 public
    r = await s.ssh(key, "new", "--template=static-site", "--name=site1", "--json", timeout=300)
    assert r.exit_status == 0, r
    made = json.loads(r.stdout)
    assert made["setup"] == {"template": "static-site", "state": "done"}, made
    async with browser_client() as c:
        page = await c.get(web.url("site1.localhost"))  # anonymous: public from the start
        assert page.status_code == 200 and "Hello from static-site" in page.text
    log = (await s.ssh(key, "cat ~/.ussycode/setup.log", user="site1")).stdout
    assert "serving ~/site" in log and "setup exited with status 0" in log
    assert "template static-site, setup done" in (await s.ssh(key, "ls", "-l")).stdout

    # an operator's own template in <data-dir>/templates, with flags overriding it
    custom = Path(s.data_dir) / "templates" / "team-box"
    custom.mkdir(parents=True)
    (custom / "template.toml").write_text('description = "our team box"\ncpu = 1\nmemory_mb = 512\n'
                                          'env = { TEAM = "blue" }\n')
    (custom / "setup.sh").write_text('echo "hello $TEAM" > "$HOME/welcome.txt"\nexit 3\n')
    r = await s.ssh(key, "new", "--template=team-box", "--name=team1", "--memory=768", "--json", timeout=300)
    assert r.exit_status == 0, r
    made = json.loads(r.stdout)
    assert made["memory_mb"] == 768 and made["setup"]["state"] == "failed"  # setup.sh exited 3
    assert (await s.ssh(key, "cat ~/welcome.txt", user="team1")).stdout.strip() == "hello blue"
    listed = {t["name"]: t for t in json.loads((await s.ssh(key, "template", "list", "--json")).stdout)}
    assert listed["team-box"]["source"] == "operator"

    # bad templates: unknown, hostile name, broken toml — clear errors, no VM made
    (Path(s.data_dir) / "templates" / "broken").mkdir()
    (Path(s.data_dir) / "templates" / "broken" / "template.toml").write_text("description = [unclosed\n")
    for name, code, words in (("nosuch", 1, "no template"), ("../../etc", 2, "invalid template"),
                              ("broken", 2, "is broken")):
        r = await s.ssh(key, "new", f"--template={name}", "--name=nothere")
        assert r.exit_status == code and words in r.stderr, (name, r)
    assert "nothere" not in (await s.ssh(key, "ls")).stdout


async def test_web_templates_in_the_full_image(web, needs_vms: None) -> None:
    require_full_image(web)
    s = web.server
    key = await s.register("webber")
    for name, vm, words in (("python-web", "pyweb", "Hello from python-web"), ("node-web", "nodeweb",
                                                                               "Hello from node-web")):
        r = await s.ssh(key, "new", f"--template={name}", f"--name={vm}", "--json", timeout=300)
        assert r.exit_status == 0 and json.loads(r.stdout)["setup"]["state"] == "done", r
        assert (await s.ssh(key, "share", "set-public", vm)).exit_status == 0
        async with browser_client() as c:
            page = await c.get(web.url(f"{vm}.localhost"))
            assert page.status_code == 200 and words in page.text, (name, page.status_code, page.text[:200])
            # the documented edit loop: ~/app/restart stops the app, starts it again, returns once it answers
            before = (await s.ssh(key, "cat ~/app/server.pid", user=vm)).stdout.strip()
            r = await s.ssh(key, "~/app/restart && cat ~/app/server.pid", user=vm, timeout=60)
            assert r.exit_status == 0 and r.stdout.strip() != before, r
            page = await c.get(web.url(f"{vm}.localhost"))
            assert page.status_code == 200 and words in page.text, (name, page.status_code, page.text[:200])


async def test_agents_and_lessons_in_the_full_image(web_factory, needs_vms: None) -> None:
    """In the full image: `new --prompt` runs the real pi through the gateway to a local provider (the owner's key,
    never the VM's), `agent-playground` does the same from its template, and tutorial lessons 6 (git) and 8 (the
    agent) turn done on that real state."""

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    seen: list[str] = []

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        seen.append(request.headers.get("authorization", ""))
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body.get("model"),
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello from the provider."},
                              "finish_reason": None}]}
        done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 5}}

        async def events():  # type: ignore[no-untyped-def]
            for part in (chunk, done, usage):
                yield f"data: {json.dumps(part)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async with serve_local(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                           "provider") as port:
        web = await web_factory(llm={"providers": {"openai": {"base_url": f"http://127.0.0.1:{port}"}}})
        require_full_image(web)
        s = web.server
        key = await s.register("kim")
        assert (await s.ssh(key, "llm-key", "set", "openai", stdin=b"sk-kim-owner-0001\n")).exit_status == 0
        r = await s.ssh(key, "new", "--name=kim-tut", "--image=ussyuntu", "--memory=1024",
                        "--prompt='say hello'", "--json", timeout=300)
        assert r.exit_status == 0, r

        assert await agent_finished(s, key, "kim-tut") == "done"
        assert "Hello from the provider." in (await s.ssh(key, "cat ~/.ussycode/agent.log", user="kim-tut")).stdout
        assert seen and set(seen) == {"Bearer sk-kim-owner-0001"}
        # lessons 6 and 8 on that real state
        git = ("mkdir -p ~/project && cd ~/project && git init -q && echo x > README.md && git add README.md && "
               "git -c user.name=k -c user.email=k@example.com commit -qm first")
        assert (await s.ssh(key, git, user="kim-tut")).exit_status == 0
        rows = {r["lesson"]: r["done"] for r in json.loads((await s.ssh(key, "tutorial", "status", "--json")).stdout)}
        assert rows[6] is True and rows[8] is True and rows[1] is True
        # agent-playground: the template's prompt runs the agent the same way
        r = await s.ssh(key, "new", "--template=agent-playground", "--name=kimplay", "--memory=1024", "--json",
                        timeout=300)
        assert r.exit_status == 0 and json.loads(r.stdout)["agent"]["name"] == "pi", r
        assert await agent_finished(s, key, "kimplay") == "done"

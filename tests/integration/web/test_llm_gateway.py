"""The LLM gateway from inside real VMs: a VM sends no key and the upstream gets its owner's (never another's, never
the VM's), streams pass through, usage comes from the upstream's own fields, budgets and missing keys refuse before
the upstream is called, a dead upstream is a clear 502, and no key reaches a log line.

The only stand-in is the upstream: a local HTTP server speaking OpenAI's chat completions and Anthropic's messages
(JSON and SSE, with usage), as the providers do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ussycode.auth.identity import Actor

from .conftest import browser_client, free_port, serve_local

pytestmark = pytest.mark.asyncio

# Inside the VM: one request to the gateway with the Python standard library, printing status and body.
CLIENT = r'''
import json, sys, urllib.request, urllib.error
provider, path, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(f"http://169.254.169.254/gateway/llm/{provider}/{path}", data=body.encode() or None,
                             method="POST" if body else "GET",
                             headers={"Content-Type": "application/json", "Authorization": "Bearer vm-made-up",
                                      "x-api-key": "vm-made-up", "X-Forwarded-For": "6.6.6.6",
                                      "anthropic-version": "2023-06-01"})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        print(r.status); print(r.headers.get("content-type")); sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.headers.get("content-type")); sys.stdout.write(e.read().decode())
'''


# Inside the VM: N requests at once (threads), printing each status.
BURST = r'''
import json, sys, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
def one(_):
    req = urllib.request.Request("http://169.254.169.254/gateway/llm/openai/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
with ThreadPoolExecutor(int(sys.argv[1])) as pool:
    print("\n".join(str(s) for s in pool.map(one, range(int(sys.argv[1])))))
'''


class Upstream:
    """What the fake provider saw, and its answers."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            self.seen.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
            if body.get("stream"):
                async def events() -> Any:
                    for word in ("hel", "lo"):
                        yield f'data: {json.dumps({"choices": [{"delta": {"content": word}}]})}\n\n'.encode()
                        await asyncio.sleep(0.05)
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":9}}\n\n'
                    yield b"data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"choices": [{"message": {"content": "hello"}}],
                                 "usage": {"prompt_tokens": 11, "completion_tokens": 7}})

        async def messages(request: Request) -> Response:
            self.seen.append({"path": request.url.path, "headers": dict(request.headers),
                              "body": json.loads(await request.body())})
            return JSONResponse({"content": [{"text": "hi"}], "usage": {"input_tokens": 5, "output_tokens": 3}})

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/v1/messages", messages, methods=["POST"])])


async def in_vm(web: Any, key: Any, vm: str, provider: str, path: str, body: dict[str, Any] | None) -> tuple[int, str]:
    # a file per call: calls into one VM run concurrently, and one must not truncate the script another runs
    r = await web.server.ssh(key, 'f=$(mktemp) && cat > "$f" && python3 "$f" ' + " ".join(
        json.dumps(x) for x in (provider, path, json.dumps(body) if body is not None else "")),
        user=vm, stdin=CLIENT.encode())
    assert r.exit_status == 0, r
    status, _content_type, text = r.stdout.split("\n", 2)
    return int(status), text


async def test_the_gateway_from_real_vms(web_factory, needs_vms: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = Upstream()
    async with serve_local(upstream.app(), "fake-upstream") as port:
        dead = free_port()
        llm = {"providers": {"openai": {"base_url": f"http://127.0.0.1:{port}"},
                             "anthropic": {"base_url": f"http://127.0.0.1:{port}"},
                             "vllm": {"base_url": f"http://127.0.0.1:{dead}"}},
               "budgets": {"newbie": 980}, "requests_per_minute": 6000}
        web = await web_factory(llm=llm)
        await web.server.register("root1")
        alice, bob, carol = [await web.server.register(n) for n in ("alice", "bob", "carol")]
        for key, secret in ((alice, "sk-alice-0001aaaa"), (bob, "sk-bob-0002bbbb")):
            r = await web.server.ssh(key, "llm-key", "set", "openai", stdin=f"{secret}\n".encode())
            assert r.exit_status == 0 and "stored" in r.stdout and secret not in r.stdout + r.stderr, r
        r = await web.server.ssh(alice, "llm-key", "set", "anthropic", stdin=b"sk-ant-alice-9999\n")
        assert r.exit_status == 0, r
        keys = json.loads((await web.server.ssh(alice, "llm-key", "list", "--json")).stdout)
        assert [(k["provider"], k["hint"]) for k in keys] == [("anthropic", "…9999"), ("openai", "…aaaa")]
        for owner, vm in ((alice, "avm"), (bob, "bvm"), (carol, "cvm")):
            assert (await web.server.ssh(owner, "new", f"--name={vm}")).exit_status == 0

        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        # each VM reaches the upstream with its own owner's key, concurrently; the VM's made-up credentials and
        # forwarding headers never arrive
        results = await asyncio.gather(*(in_vm(web, k, v, "openai", "v1/chat/completions", chat)
                                         for k, v in ((alice, "avm"), (bob, "bvm")) * 3))
        assert all(status == 200 and json.loads(text)["choices"] for status, text in results)
        auths = sorted(s["headers"].get("authorization") for s in upstream.seen)
        assert auths == ["Bearer sk-alice-0001aaaa"] * 3 + ["Bearer sk-bob-0002bbbb"] * 3
        assert not any("x-api-key" in s["headers"] or "x-forwarded-for" in s["headers"] for s in upstream.seen)
        # 100 requests at once, 25 from each of four VMs of two users (a VM may hold 32 metadata requests at
        # once): every one reaches the upstream with its own owner's key
        for owner, vm in ((alice, "avm2"), (bob, "bvm2")):
            assert (await web.server.ssh(owner, "new", f"--name={vm}")).exit_status == 0
        before = len(upstream.seen)
        bursts = await asyncio.gather(*(web.server.ssh(k, "python3 -c " + shlex.quote(BURST) + " 25", user=v)
                                        for k, v in ((alice, "avm"), (alice, "avm2"), (bob, "bvm"),
                                                     (bob, "bvm2"))))
        assert all(b.exit_status == 0 and b.stdout.split() == ["200"] * 25 for b in bursts), bursts
        burst_auths = [x["headers"].get("authorization") for x in upstream.seen[before:]]
        assert sorted(burst_auths) == ["Bearer sk-alice-0001aaaa"] * 50 + ["Bearer sk-bob-0002bbbb"] * 50
        # a stream passes through, and the gateway asked the upstream to report its usage
        status, text = await in_vm(web, alice, "avm", "openai", "v1/chat/completions", {**chat, "stream": True})
        assert status == 200 and '"hel"' in text and '"lo"' in text and "[DONE]" in text
        assert upstream.seen[-1]["body"]["stream_options"] == {"include_usage": True}
        # anthropic's format: x-api-key, the client's anthropic-version kept
        status, _ = await in_vm(web, alice, "avm", "anthropic", "v1/messages", {"model": "c", "messages": []})
        assert status == 200
        assert upstream.seen[-1]["headers"]["x-api-key"] == "sk-ant-alice-9999"
        assert upstream.seen[-1]["headers"]["anthropic-version"] == "2023-06-01"
        assert "authorization" not in upstream.seen[-1]["headers"]

        # usage as the upstream reported it: 53 x 18 + 21 (stream) + 8 (anthropic)
        usage = json.loads((await web.server.ssh(alice, "llm", "usage", "--json")).stdout)
        assert usage["day"]["tokens"] == 53 * 18 + 21 + 8 and usage["day"]["requests"] == 55
        assert usage["day"]["budget"] == 980 and usage["providers"]["openai"]["tokens"] == 975
        assert usage["providers"]["anthropic"] == {"tokens": 8, "requests": 1, "input_tokens": 5,
                                                   "output_tokens": 3}
        # over the newbie budget (980): refused before the upstream is called, with the reset time
        before = len(upstream.seen)
        status, text = await in_vm(web, alice, "avm", "openai", "v1/chat/completions", chat)
        assert status == 429 and "budget" in json.loads(text)["error"] and "resets at" in json.loads(text)["error"]
        assert len(upstream.seen) == before
        # no key: 401 naming the command; unknown provider: 404; dead upstream: 502
        status, text = await in_vm(web, carol, "cvm", "openai", "v1/chat/completions", chat)
        assert status == 401 and "llm-key set openai" in json.loads(text)["error"]
        status, text = await in_vm(web, carol, "cvm", "nosuch", "v1/x", chat)
        assert status == 404 and json.loads(text)["code"] == 404
        status, text = await in_vm(web, carol, "cvm", "vllm", "v1/chat/completions", chat)
        assert status == 502 and json.loads(text)["code"] == 502
        assert len(upstream.seen) == before
        # /env inside the VM: the gateway's URLs, no key
        r = await web.server.ssh(alice, "python3 -c \"import urllib.request as u; print(u.urlopen("
                                 "'http://169.254.169.254/env').read().decode())\"", user="avm")
        assert "OPENAI_BASE_URL=http://169.254.169.254/gateway/llm/openai/v1" in r.stdout
        assert "sk-" not in r.stdout and "USSYCODE_VM_NAME=avm" in r.stdout
        # the admin panel shows the usage per user, provider and day, and today's total on the dashboard
        services = web.server.app.services
        root = await services.users.by_handle("root1")
        redeemed = await services.sessions.redeem_login_token(
            await services.sessions.create_login_token(Actor(root, "ssh")), "localhost")
        async with browser_client(headers={"Cookie": f"ussy_session={redeemed[0]}"}) as c:
            page = (await c.get(web.url("localhost", "/admin/llm"))).text
            assert 'alice</a></td><td>openai</td><td>54</td><td>595</td><td>380</td><td>975</td>' in page, page
            assert 'alice</a></td><td>anthropic</td><td>1</td><td>5</td><td>3</td><td>8</td>' in page
            assert 'bob</a></td><td>openai</td><td>53</td><td>583</td><td>371</td><td>954</td>' in page
            dash = (await c.get(web.url("localhost", "/admin/"))).text
            assert '<b id="llm-today">1937</b>' in dash
        # removing the key: the next request is refused
        assert (await web.server.ssh(bob, "llm-key", "rm", "openai")).exit_status == 0
        status, _ = await in_vm(web, bob, "bvm", "openai", "v1/chat/completions", chat)
        assert status == 401
        # bad input to the commands
        r = await web.server.ssh(carol, "llm-key", "set", "openai", stdin=b"has a space in it\n")
        assert r.exit_status == 2 and r.stderr.startswith("error:")
        r = await web.server.ssh(carol, "llm-key", "set", "nosuch", stdin=b"sk-x\n")
        assert r.exit_status == 1 and "unknown LLM provider" in r.stderr
        r = await web.server.ssh(carol, "llm-key", "set", "vllm", stdin=b"sk-x\n")
        assert r.exit_status == 2 and "needs no key" in r.stderr
    # no key in any log line of the server
    logged = caplog.text
    for secret in ("sk-alice-0001aaaa", "sk-bob-0002bbbb", "sk-ant-alice-9999"):
        assert secret not in logged

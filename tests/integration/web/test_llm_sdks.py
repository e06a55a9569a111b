"""The official OpenAI and Anthropic Python SDKs inside a real VM, configured only by the VM's environment
(`169.254.169.254/env`, as the README shows): JSON and streaming calls reach the stand-in provider with the owner's
key, usage comes from the provider's own fields, a stream that crosses the daily budget finishes (its tokens are
already spent upstream) and the next call is refused with 429, which the SDKs raise as their rate-limit error; the
real `opencode` runs one prompt unattended the same way, and a run whose provider never answers is stopped at the
server's `agent_run_seconds` and reported failed.

The SDKs' wheels are downloaded by `make test` (scripts/test.sh) beside the test images and carried into the VM over
SSH; the VM installs them with pip from that directory, with no index.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conftest import agent_finished, require_full_image, serve_local

pytestmark = pytest.mark.asyncio
RUN_SECONDS = 30  # the agent runs' limit on this test's server
WHEELS = Path(os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images")) / "sdk-wheels"

# Inside the VM: each SDK call prints one JSON line; a refused call prints the SDK's exception class and status.
CLIENT = r'''
import json, sys
import anthropic, openai
o = openai.OpenAI(max_retries=0)  # base URL and placeholder key from the environment (169.254.169.254/env)
a = anthropic.Anthropic(max_retries=0)
msgs = [{"role": "user", "content": "hi"}]

def step(name, call):
    try:
        print(json.dumps({"step": name, **call()}), flush=True)
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        print(json.dumps({"step": name, "error": type(e).__name__, "status": e.status_code,
                          "message": f"{e} {e.body}"}), flush=True)

def openai_json():
    r = o.chat.completions.create(model="gpt-4.1", messages=msgs)
    return {"text": r.choices[0].message.content, "tokens": r.usage.prompt_tokens + r.usage.completion_tokens}

def openai_stream():
    chunks = o.chat.completions.create(model="gpt-4.1", messages=msgs, stream=True,
                                       stream_options={"include_usage": True})
    text, tokens = "", 0
    for ch in chunks:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
        if ch.usage:
            tokens = ch.usage.prompt_tokens + ch.usage.completion_tokens
    return {"text": text, "tokens": tokens}

def anthropic_json():
    r = a.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=msgs)
    return {"text": r.content[0].text, "tokens": r.usage.input_tokens + r.usage.output_tokens}

def anthropic_stream():
    with a.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=msgs) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    return {"text": text, "tokens": final.usage.input_tokens + final.usage.output_tokens}

for name in sys.argv[1:]:
    step(name, globals()[name])
'''


class Provider:
    """OpenAI chat completions and Anthropic messages, JSON and SSE, in the shapes the SDKs parse."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []
        self.release = asyncio.Event()  # a prompt asking to hang waits for this (set at the end of the test)

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            self.keys.append(("openai", request.headers.get("authorization", "")))
            if "PLEASE-HANG-FOREVER" in json.dumps(body.get("messages")):
                await self.release.wait()
            base = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
            if not body.get("stream"):
                return JSONResponse({**base, "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hello from openai"},
                     "finish_reason": "stop"}], "usage": {"prompt_tokens": 11, "completion_tokens": 7,
                                                          "total_tokens": 18}})

            async def events() -> Any:
                for word in ("streamed ", "from ", "openai"):
                    yield "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"content": word}, "finish_reason": None}]}) + "\n\n"
                    await asyncio.sleep(0.02)
                yield "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
                yield "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [],
                                             "usage": {"prompt_tokens": 20, "completion_tokens": 30,
                                                       "total_tokens": 50}}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        async def messages(request: Request) -> Response:
            body = json.loads(await request.body())
            self.keys.append(("anthropic", request.headers.get("x-api-key", "")))
            message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                       "stop_sequence": None}
            if not body.get("stream"):
                return JSONResponse({**message, "content": [{"type": "text", "text": "hello from anthropic"}],
                                     "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 3}})

            def event(kind: str, data: dict[str, Any]) -> str:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

            async def events() -> Any:
                yield event("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                                          "usage": {"input_tokens": 10, "output_tokens": 1}}})
                yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                for word in ("streamed ", "from ", "anthropic"):
                    yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}})
                    await asyncio.sleep(0.02)
                yield event("content_block_stop", {"index": 0})
                yield event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                              "usage": {"output_tokens": 40}})
                yield event("message_stop", {})
            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/v1/messages", messages, methods=["POST"])])


def wheels_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for wheel in sorted(WHEELS.glob("*.whl")):
            tar.add(wheel, arcname=wheel.name)
    return buf.getvalue()


async def test_official_sdks_and_opencode_in_a_vm(web_factory, needs_vms: None) -> None:
    if not any(WHEELS.glob("openai-*.whl")) or not any(WHEELS.glob("anthropic-*.whl")):
        pytest.skip(f"the SDK wheels are not in {WHEELS} (scripts/test.sh downloads them)")
    provider = Provider()
    async with serve_local(provider.app(), "provider") as port:
        base = f"http://127.0.0.1:{port}"
        try:
            budget = 100  # tokens a day, whatever the tier: the anthropic stream below crosses it
            web = await web_factory(llm={"providers": {"openai": {"base_url": base}, "anthropic": {"base_url": base}},
                                         "budgets": {t: budget for t in ("newbie", "citizen", "operator", "admin")}},
                                    agent_run_seconds=RUN_SECONDS)
            require_full_image(web)
            s = web.server
            key = await s.register("sdkuser")
            for name, secret in (("openai", "sk-openai-owner-0042"), ("anthropic", "sk-ant-owner-0042")):
                assert (await s.ssh(key, "llm-key", "set", name, stdin=f"{secret}\n".encode())).exit_status == 0
            r = await s.ssh(key, "new", "--name=sdkvm", "--image=ussyuntu", "--memory=1024", "--json", timeout=300)
            assert r.exit_status == 0, r
            install = ("rm -rf ~/wheels && mkdir ~/wheels && tar x -C ~/wheels && python3 -m venv ~/sdk && "
                       "~/sdk/bin/pip install -q --no-index --find-links ~/wheels openai anthropic")
            r = await s.ssh(key, install, user="sdkvm", stdin=wheels_tar(), timeout=300)
            assert r.exit_status == 0, r

            async def run(*steps: str) -> list[dict[str, Any]]:
                r = await s.ssh(key, "cat > /tmp/sdk.py && "
                                "eval \"$(curl -s 169.254.169.254/env | sed 's/^/export /')\" "
                                "&& ~/sdk/bin/python /tmp/sdk.py " + " ".join(steps),
                                user="sdkvm", stdin=CLIENT.encode(), timeout=120)
                assert r.exit_status == 0, r
                return [json.loads(line) for line in r.stdout.splitlines()]

            async def used() -> int:
                return int(json.loads((await s.ssh(key, "llm", "usage", "--json")).stdout)["day"]["tokens"])

            out = await run("openai_json", "openai_stream", "anthropic_json")
            assert out == [{"step": "openai_json", "text": "hello from openai", "tokens": 18},
                           {"step": "openai_stream", "text": "streamed from openai", "tokens": 50},
                           {"step": "anthropic_json", "text": "hello from anthropic", "tokens": 8}], out
            assert set(provider.keys) == {("openai", "Bearer sk-openai-owner-0042"),
                                          ("anthropic", "sk-ant-owner-0042")}, provider.keys
            for _ in range(50):  # usage is written after the response ends
                if await used() == 76:
                    break
                await asyncio.sleep(0.1)
            assert await used() == 76

            # 76 used of 100: the stream is let in, reports 50 more and finishes whole; the next call is refused
            out = await run("anthropic_stream")
            assert out == [{"step": "anthropic_stream", "text": "streamed from anthropic", "tokens": 50}], out
            for _ in range(50):
                if await used() == 126:
                    break
                await asyncio.sleep(0.1)
            calls = len(provider.keys)
            out = await run("openai_json", "anthropic_json")
            assert [(o["error"], o["status"]) for o in out] == [("RateLimitError", 429)] * 2, out
            assert all("budget" in o["message"] for o in out), out
            assert len(provider.keys) == calls  # refused before the provider was called
            usage = json.loads((await s.ssh(key, "llm", "usage", "--json")).stdout)
            assert usage["day"]["tokens"] == 126 and usage["day"]["budget"] == budget, usage
            assert usage["providers"]["openai"]["tokens"] == 68 and usage["providers"]["anthropic"]["tokens"] == 58

            # the real opencode, unattended, on another user's VM with a budget left: the same gateway, that owner's key
            key2 = await s.register("ocuser")
            assert (await s.ssh(key2, "llm-key", "set", "openai", stdin=b"sk-openai-other-0077\n")).exit_status == 0
            r = await s.ssh(key2, "new", "--name=ocvm", "--image=ussyuntu", "--memory=1024", "--agent=opencode",
                            "--prompt='say hello'", "--json", timeout=300)
            assert r.exit_status == 0, r

            state = await agent_finished(s, key2, "ocvm", 180)
            log = (await s.ssh(key2, "cat ~/.ussycode/agent.log", user="ocvm")).stdout
            assert state == "done", log
            assert "streamed from openai" in log, log
            assert ("openai", "Bearer sk-openai-other-0077") in provider.keys[calls:]
            assert {k for _, k in provider.keys[calls:]} == {"Bearer sk-openai-other-0077"}

            # an unattended run whose provider never answers is stopped at agent_run_seconds and reported failed
            r = await s.ssh(key2, "new", "--name=hangvm", "--image=ussyuntu", "--memory=1024", "--agent=pi",
                            "--prompt=PLEASE-HANG-FOREVER", "--json", timeout=300)
            assert r.exit_status == 0, r
            state = await agent_finished(s, key2, "hangvm")
            log = (await s.ssh(key2, "cat ~/.ussycode/agent.log", user="hangvm")).stdout
            assert state == "failed", log
            assert f"the agent ran longer than {RUN_SECONDS} s and was stopped" in log, log
        finally:
            provider.release.set()  # the request that hangs on purpose ends, so the server can stop


"""Routussy in front of registration and as an LLM provider, against a local stand-in speaking its two endpoints:
approval by fingerprint (fail closed: refused, unreachable and odd answers all refuse; trusted ranges skip it;
registered users never depend on it) and ``/v1/…`` called by the server with the shared secret and the owner's
fingerprint, never by the VM with a credential."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .conftest import serve_local
from .test_llm_gateway import in_vm

pytestmark = pytest.mark.asyncio
SECRET = "routussy-shared-secret-42"


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub", "-E", "sha256"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


class FakeRoutussy:
    def __init__(self) -> None:
        self.approved: set[str] = set()
        self.mode = "normal"  # or "error" (answers 500)
        self.seen: list[dict[str, Any]] = []

    def app(self) -> Starlette:
        async def approve(request: Request) -> Response:
            self.seen.append({"path": request.url.path, "headers": dict(request.headers),
                              "query": dict(request.query_params)})
            if request.headers.get("authorization") != f"Bearer {SECRET}":
                return JSONResponse({"error": "bad secret"}, 401)
            if self.mode == "error":
                return JSONResponse({"error": "boom"}, 500)
            if request.query_params.get("fingerprint") in self.approved:
                return JSONResponse({"user": "ok"})
            return JSONResponse({"error": "unknown"}, 404)

        async def chat(request: Request) -> Response:
            self.seen.append({"path": request.url.path, "headers": dict(request.headers)})
            return JSONResponse({"choices": [{"message": {"content": "from routussy"}}],
                                 "usage": {"prompt_tokens": 2, "completion_tokens": 3}})

        return Starlette(routes=[Route("/ussycode/user-by-fingerprint", approve, methods=["GET"]),
                                 Route("/v1/chat/completions", chat, methods=["POST"])])


async def test_routussy_gates_registration_and_serves_llm(web_factory, needs_vms: None) -> None:
    fake = FakeRoutussy()
    async with serve_local(fake.app(), "fake-routussy") as port:
        web = await web_factory(routussy_url=f"http://127.0.0.1:{port}", routussy_key=SECRET,
                                trusted_cidrs="127.0.0.9/32")
        s = web.server
        approved, stranger, local = s.key("approved"), s.key("stranger"), s.key("local")
        fake.approved.add(fingerprint(approved))
        r = await s.ssh(approved, "register", "approved")
        assert r.exit_status == 0, r
        assert fake.seen[-1]["query"]["fingerprint"] == fingerprint(approved)
        r = await s.ssh(stranger, "register", "stranger")
        assert r.exit_status == 1 and "not approved" in r.stderr, r
        # a trusted range registers without asking
        asked = len(fake.seen)
        assert (await s.ssh(local, "register", "local", bind="127.0.0.9")).exit_status == 0
        assert len(fake.seen) == asked
        # odd answers and an unreachable Routussy refuse too; registered users are not affected
        fake.mode = "error"
        r = await s.ssh(stranger, "register", "stranger")
        assert r.exit_status == 1 and "answered 500" in r.stderr, r
        fake.mode = "normal"

        # the LLM provider: the server calls Routussy with the shared secret and the owner's fingerprint
        assert (await s.ssh(approved, "new", "--name=rvm")).exit_status == 0
        status, text = await in_vm(web, approved, "rvm", "routussy", "v1/chat/completions",
                                   {"model": "m", "messages": []})
        assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] == "from routussy"
        call = fake.seen[-1]
        assert call["path"] == "/v1/chat/completions"
        assert call["headers"]["authorization"] == f"Bearer {SECRET}"
        assert call["headers"]["x-ussycode-fingerprint"] == fingerprint(approved)
        usage = json.loads((await s.ssh(approved, "llm", "usage", "--json")).stdout)
        assert usage["providers"]["routussy"]["tokens"] == 5
        # the secret is nowhere the VM can read
        r = await s.ssh(approved, "python3 -c \"import urllib.request as u; print(u.urlopen("
                        "'http://169.254.169.254/env').read().decode() + u.urlopen('http://169.254.169.254/')"
                        ".read().decode())\"", user="rvm")
        assert r.exit_status == 0 and SECRET not in r.stdout
    # Routussy gone: new keys are refused (fail closed), existing users go on
    r = await s.ssh(stranger, "register", "stranger")
    assert r.exit_status == 1 and "could not be reached" in r.stderr, r
    assert (await s.ssh(approved, "whoami")).exit_status == 0

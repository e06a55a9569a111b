"""Helpers for API tests: an httpx client on the app server's loopback port, tokens made over real SSH."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ussycode.store import audit


@dataclass
class Api:
    server: Any  # tests/integration/conftest.py::Server
    client: httpx.AsyncClient

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.app.http_port}"

    async def exec(self, token: str | None, body: str | bytes | None = None, *,
                   content_type: str | None = "text/plain", json_body: Any = None,
                   headers: dict[str, str] | None = None, method: str = "POST") -> httpx.Response:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            return await self.client.request(method, f"{self.base}/exec", json=json_body, headers=h)
        if content_type is not None:
            h["Content-Type"] = content_type
        return await self.client.request(method, f"{self.base}/exec", content=body, headers=h)

    async def run(self, token: str, line: str) -> dict[str, Any]:
        """POST a command that must run (HTTP 200); returns the reply."""
        r = await self.exec(token, line)
        assert r.status_code == 200, (r.status_code, r.text)
        reply: dict[str, Any] = r.json()
        return reply

    async def create_token(self, key: Path, *args: str) -> dict[str, Any]:
        r = await self.server.ssh(key, "token", "create", *args, "--json")
        assert r.exit_status == 0, r
        created: dict[str, Any] = json.loads(r.stdout)
        return created

    async def audit(self, action: str) -> list[dict[str, Any]]:
        return await self.server.app.services.store.read(lambda c: audit.recent(c, 1000, action))


@pytest.fixture
async def api_factory() -> AsyncIterator[Callable[[Any], Api]]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        yield lambda server: Api(server, client)


@pytest.fixture
async def api(server: Any, api_factory: Callable[[Any], Api]) -> Api:
    return api_factory(server)

"""504: a command over the time limit is cancelled (its coroutine sees CancelledError) and the server goes on."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette

from ussycode.api.exec import exec_routes
from ussycode.commands.context import CommandContext
from ussycode.commands.registry import REGISTRY, command

pytestmark = pytest.mark.asyncio


@pytest.fixture
def slow_command() -> Iterator[dict[str, Any]]:
    """A real registered command that takes a minute (removed again after the test)."""
    state: dict[str, Any] = {"started": asyncio.Event(), "cancelled": False, "finished": False}

    @command("zz-slow", "test only: takes a minute")
    async def slow(ctx: CommandContext, a: argparse.Namespace) -> int:
        state["started"].set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        state["finished"] = True
        return 0

    yield state
    REGISTRY.pop("zz-slow", None)


async def test_command_over_the_limit_is_cancelled(server, api, slow_command) -> None:
    key = await server.register("kim")
    token = (await api.create_token(key))["token"]
    # the same endpoint, on its own loopback server with a short limit (the real one allows 30 s)
    app = Starlette(routes=exec_routes(timeout=0.5))
    app.state.services = server.app.services
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(uv.serve())
        while not uv.started:
            await asyncio.sleep(0.01)
        port = uv.servers[0].sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await api.client.post(f"http://127.0.0.1:{port}/exec", content="zz-slow",
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain"})
        elapsed = loop.time() - t0
        assert r.status_code == 504 and r.json() == {"error": "the command ran over 0.5 s and was cancelled",
                                                     "code": 504}
        assert elapsed < 5
        assert slow_command["started"].is_set() and slow_command["cancelled"] and not slow_command["finished"]
        r = await api.client.post(f"http://127.0.0.1:{port}/exec", content="whoami",
                                  headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["exit_code"] == 0
        uv.should_exit = True
    # the real server's limit is 30 s
    assert (await api.run(token, "whoami"))["exit_code"] == 0

"""Share links typed back into the lobby: by id, by token or by the whole printed URL."""

from __future__ import annotations

import json

import pytest

from ussycode.runtime.container import ContainerRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


async def test_remove_link_by_id_token_or_url(server) -> None:
    key = await server.register("linker")
    assert (await server.ssh(key, "new", "--name=links1", "--disk=1", "--json")).exit_status == 0
    links = [json.loads((await server.ssh(key, "share", "add-link", "links1", "--json")).stdout) for _ in range(3)]
    tokens = [link["url"].split("ussy_share=")[1] for link in links]
    r = await server.ssh(key, "share", "remove-link", "links1", tokens[0])
    assert r.exit_status == 0, r
    r = await server.ssh(key, "share", "remove-link", "links1", f"'{links[1]['url']}'")
    assert r.exit_status == 0, r
    r = await server.ssh(key, "share", "remove-link", "links1", links[2]["id"])
    assert r.exit_status == 0, r
    shown = json.loads((await server.ssh(key, "share", "show", "links1", "--json")).stdout)
    assert shown["links"] == []
    r = await server.ssh(key, "share", "remove-link", "links1", tokens[1])
    assert r.exit_status == 1 and "no such share link" in r.stderr  # already gone: a clear error
    assert (await server.ssh(key, "rm", "links1", "--yes")).exit_status == 0

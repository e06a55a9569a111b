"""``doc`` in the lobby (no terminal: 80 columns; a terminal: its width) and ``/docs/`` through the front door."""

from __future__ import annotations

import pytest

from .conftest import browser_client

pytestmark = pytest.mark.asyncio


async def test_doc_in_the_lobby_and_on_the_web(web) -> None:
    s = web.server
    key = await s.register("reader")
    r = await s.ssh(key, "doc")
    assert r.exit_status == 0 and "getting-started" in r.stdout and "limits" in r.stdout
    r = await s.ssh(key, "doc", "sharing")
    assert r.exit_status == 0 and r.stdout.startswith("SHARING\n=======")
    assert all(len(line) <= 80 for line in r.stdout.splitlines() if not line.startswith("    "))
    assert "\x1b" not in r.stdout
    r = await s.ssh(key, "doc", "nosuch")
    assert r.exit_status == 1 and "topics:" in r.stderr
    # an interactive terminal 50 columns wide: lines fit it
    async with await s.connect(key) as conn:
        proc = await conn.create_process("doc vms", term_type="xterm", term_size=(50, 24))
        out = await proc.stdout.read()
        await proc.wait()
    lines = [line for line in out.replace("\r", "").splitlines() if line and not line.startswith("    ")]
    assert lines and max(len(line) for line in lines) <= 50, lines
    # the same pages as HTML at https://<domain>/docs/
    async with browser_client() as c:
        index = await c.get(web.url("localhost", "/docs/"))
        assert index.status_code == 200 and "doc sharing" in index.text
        page = await c.get(web.url("localhost", "/docs/sharing"))
        assert page.status_code == 200 and "<h1>Sharing</h1>" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert (await c.get(web.url("localhost", "/docs/..%2f..%2fetc%2fpasswd"))).status_code == 404
        assert (await c.get(web.url("localhost", "/docs/nosuch"))).status_code == 404

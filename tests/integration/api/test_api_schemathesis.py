"""schemathesis (property-based, from /openapi.json) against the live app server: no 5xx, responses conform."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.asyncio

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,unsupported_method,ignored_auth")


async def test_schemathesis_against_live_server(server_factory, api_factory, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    if not st.exists() and shutil.which("st") is None:
        pytest.skip("schemathesis not installed (pip install -e '.[dev]')")
    server = await server_factory(rate_per_minute=100_000, rate_burst=100_000)
    api = api_factory(server)
    key = await server.register("fuzz")
    # random command lines must not create VMs: this token allows only read-only commands
    token = (await api.create_token(key, "--cmds=whoami,ls,help"))["token"]
    proc = await asyncio.create_subprocess_exec(
        str(st) if st.exists() else "st", "run", f"{api.base}/openapi.json", "--url", api.base,
        "--header", f"Authorization: Bearer {token}", "--checks", CHECKS, "--max-examples", "40",
        "--max-time", "45", "--workers", "1", "--request-timeout", "35", "--generation-database", "none",
        "--seed", "1", "--no-color", "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert proc.returncode == 0, text[-6000:]
    junit = (tmp_path / "junit.xml").read_text()
    assert "POST /exec" in junit and "GET /health" in junit, junit[:2000]
    # the server is still healthy afterwards
    assert (await api.client.get(f"{api.base}/health")).status_code == 200

"""The metadata service at http://169.254.169.254/ from inside real VMs (CONTRACT §4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ussycode.runtime.container import ContainerRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

FETCH = ("python3 -c \"import sys, urllib.request as u; r = u.urlopen('http://169.254.169.254' + sys.argv[1], "
         "timeout=5); print(r.read().decode(), end='')\" ")
RAW = ("python3 -c \"import socket, sys; s = socket.create_connection(('169.254.169.254', 80), timeout=5); "
       "s.sendall(sys.argv[1].encode().decode('unicode_escape').encode('latin-1')); "
       "print(s.recv(4096).decode(errors='replace').splitlines()[0])\" ")


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


async def test_each_vm_sees_its_own_metadata(server_factory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = await server_factory(data)
    key = await server.register("meta")
    for name in ("meta1x", "meta2x"):
        r = await server.ssh(key, "new", f"--name={name}", "--disk=1", "--env", "MODE=dev", "--json")
        assert r.exit_status == 0, r
    for name in ("meta1x", "meta2x"):
        r = await server.ssh(key, FETCH + "/", user=name)
        assert r.exit_status == 0, r
        info = json.loads(r.stdout)
        assert info["name"] == name and info["owner"] == "meta" and info["domain"] == "localhost"
        assert info["env"]["MODE"] == "dev" and info["env"]["USSYCODE_VM_NAME"] == name
        assert (await server.ssh(key, FETCH + "/hostname", user=name)).stdout == f"{name}\n"
    # read-only, bounded, and garbage gets a 400 rather than a hang
    r = await server.ssh(key, RAW + "'POST / HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n'", user="meta1x")
    assert "405" in r.stdout, r
    r = await server.ssh(key, RAW + "'\\x00\\x01garbage\\r\\n\\r\\n'", user="meta1x")
    assert "400" in r.stdout, r
    r = await server.ssh(key, RAW + "'GET / HTTP/1.1\\r\\nX: " + "a" * 20000 + "\\r\\n\\r\\n'", user="meta1x")
    assert "400" in r.stdout or "431" in r.stdout, r
    r = await server.ssh(key, RAW + "'GET /nope HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'", user="meta1x")
    assert "404" in r.stdout, r
    # it follows stop/start and a server restart
    assert (await server.ssh(key, "restart", "meta1x")).exit_status == 0
    assert json.loads((await server.ssh(key, FETCH + "/", user="meta1x")).stdout)["name"] == "meta1x"
    await server.app.stop()
    server = await server_factory(data)
    assert json.loads((await server.ssh(key, FETCH + "/", user="meta2x")).stdout)["name"] == "meta2x"
    # a rename is seen at once (identity is the listener, not the name)
    assert (await server.ssh(key, "rename", "meta2x", "meta3x")).exit_status == 0
    assert (await server.ssh(key, FETCH + "/hostname", user="meta3x")).stdout == "meta3x\n"
    for name in ("meta1x", "meta3x"):
        assert (await server.ssh(key, "rm", name, "--yes")).exit_status == 0

"""Port bridges: a unix socket whose connections are piped into a "VM" (here a fake opener to a local TCP server)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ussycode.errors import RuntimeFailure, StateError
from ussycode.proxy.bridge import BridgeManager


class FakeRuntime:
    """Stands in for Runtime.open_connection: "VM" ports map to local TCP servers; a stopped VM refuses."""

    def __init__(self) -> None:
        self.ports: dict[tuple[str, int], int] = {}
        self.stopped: set[str] = set()
        self.calls = 0

    async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.calls += 1
        if vm_id in self.stopped:
            raise StateError(f"VM {vm_id} is stopped")
        if (vm_id, port) not in self.ports:
            raise ConnectionRefusedError(111, "Connection refused")
        return await asyncio.open_connection("127.0.0.1", self.ports[(vm_id, port)])


async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes upper-cased until EOF, then writes "bye" and closes (proves half-close is passed through)."""
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.write(b"|bye")
    await writer.drain()
    writer.close()


@pytest.fixture
async def env() -> AsyncIterator[tuple[FakeRuntime, BridgeManager]]:
    server = await asyncio.start_server(echo_upper, "127.0.0.1", 0)
    rt = FakeRuntime()
    rt.ports[("vm1", 8080)] = server.sockets[0].getsockname()[1]
    run_dir = Path(tempfile.mkdtemp(prefix="ub", dir="/tmp"))
    mgr = BridgeManager(rt, run_dir, connect_timeout=1.0)
    yield rt, mgr
    await mgr.close()
    server.close()
    await server.wait_closed()


async def test_bytes_flow_both_ways_and_half_close_passes(env: tuple[FakeRuntime, BridgeManager]) -> None:
    rt, mgr = env
    bridge = await mgr.ensure("vm1", 8080)
    assert bridge.dial == mgr.dial_address("vm1", 8080) == f"unix/{bridge.path}"
    reader, writer = await asyncio.open_unix_connection(str(bridge.path))
    payload = os.urandom(3 * 1024 * 1024).hex().encode()  # 6 MiB, more than any buffer
    writer.write(payload)
    writer.write_eof()  # half-close: the upstream sees EOF and still answers
    got = await asyncio.wait_for(reader.read(-1), 10)
    assert got == payload.upper() + b"|bye"
    writer.close()


async def test_many_concurrent_connections(env: tuple[FakeRuntime, BridgeManager]) -> None:
    rt, mgr = env
    bridge = await mgr.ensure("vm1", 8080)

    async def one(i: int) -> bytes:
        r, w = await asyncio.open_unix_connection(str(bridge.path))
        w.write(f"conn{i}".encode())
        w.write_eof()
        data = await r.read(-1)
        w.close()
        return data

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert results == [f"CONN{i}|bye".encode() for i in range(50)]


@pytest.mark.parametrize("why", ["stopped", "nothing_listening"])
async def test_unreachable_vm_closes_fast(env: tuple[FakeRuntime, BridgeManager], why: str) -> None:
    rt, mgr = env
    if why == "stopped":
        rt.stopped.add("vm1")
        bridge = await mgr.ensure("vm1", 8080)
    else:
        bridge = await mgr.ensure("vm1", 3000)
    t0 = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(str(bridge.path))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        data = await asyncio.wait_for(reader.read(-1), 2)
    except ConnectionResetError:
        data = b""
    assert data == b"" and time.monotonic() - t0 < 0.5
    writer.close()


async def test_hung_runtime_is_bounded_by_connect_timeout(tmp_path: Path) -> None:
    class Hangs:
        async def open_connection(self, vm_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            await asyncio.sleep(3600)
            raise AssertionError

    mgr = BridgeManager(Hangs(), Path(tempfile.mkdtemp(prefix="ub", dir="/tmp")), connect_timeout=0.2)
    bridge = await mgr.ensure("vm1", 8080)
    reader, writer = await asyncio.open_unix_connection(str(bridge.path))
    t0 = time.monotonic()
    assert await asyncio.wait_for(reader.read(-1), 2) == b""
    assert time.monotonic() - t0 < 1.0
    writer.close()
    await mgr.close()


async def test_upstream_reset_tears_down_client(env: tuple[FakeRuntime, BridgeManager]) -> None:
    rt, mgr = env

    async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    server = await asyncio.start_server(rst, "127.0.0.1", 0)
    rt.ports[("vm1", 4000)] = server.sockets[0].getsockname()[1]
    bridge = await mgr.ensure("vm1", 4000)
    reader, writer = await asyncio.open_unix_connection(str(bridge.path))
    writer.write(b"hello")
    try:
        assert await asyncio.wait_for(reader.read(-1), 2) == b""
    except ConnectionResetError:
        pass
    await asyncio.sleep(0.05)
    assert bridge.connections == 0
    writer.close()
    server.close()


async def test_socket_permissions_idempotence_and_removal(env: tuple[FakeRuntime, BridgeManager]) -> None:
    rt, mgr = env
    b1 = await mgr.ensure("vm1", 8080)
    assert await mgr.ensure("vm1", 8080) is b1
    assert stat.S_IMODE(b1.path.stat().st_mode) == 0o660
    assert stat.S_IMODE(b1.path.parent.stat().st_mode) == 0o750
    await mgr.ensure("vm1", 3000)
    await mgr.ensure("vm2", 8080)
    assert mgr.active() == [("vm1", 3000), ("vm1", 8080), ("vm2", 8080)]
    await mgr.remove("vm1")
    assert mgr.active() == [("vm2", 8080)] and not b1.path.exists()
    await mgr.sync({("vm3", 8080), ("vm2", 8080)})
    assert mgr.active() == [("vm2", 8080), ("vm3", 8080)]
    # a connection open when the bridge closes is ended, not leaked
    b2 = mgr._bridges[("vm2", 8080)]
    rt.ports[("vm2", 8080)] = rt.ports[("vm1", 8080)]
    r, w = await asyncio.open_unix_connection(str(b2.path))
    w.write(b"x")
    assert await r.read(1) == b"X"
    await mgr.close()
    assert await asyncio.wait_for(r.read(-1), 2) == b""
    assert mgr.active() == [] and not b2.path.exists()
    w.close()


async def test_stale_socket_file_is_replaced(env: tuple[FakeRuntime, BridgeManager]) -> None:
    rt, mgr = env
    path = mgr.socket_path("vm1", 8080)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("stale")
    bridge = await mgr.ensure("vm1", 8080)
    r, w = await asyncio.open_unix_connection(str(bridge.path))
    w.write(b"ok")
    w.write_eof()
    assert await r.read(-1) == b"OK|bye"
    w.close()


def test_socket_names_are_checked(tmp_path: Path) -> None:
    mgr = BridgeManager(FakeRuntime(), tmp_path)
    for bad in ("../x", "a/b", "", "x" * 65):
        with pytest.raises(ValueError):
            mgr.socket_path(bad, 8080)
    with pytest.raises(ValueError):
        mgr.socket_path("vm1", 0)
    with pytest.raises(RuntimeFailure, match="too long"):
        BridgeManager(FakeRuntime(), Path("/tmp/" + "d" * 100)).socket_path("vm1", 8080)

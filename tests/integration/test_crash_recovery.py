"""The DB and the host agree whatever happens mid-operation (container runtime, real ``ussycode serve``).

- A client that runs ``start`` and is killed after 0.1–2 s, followed at once by ``rm --yes``: no VM process
  survives and nothing is listed.
- ``kill -9`` of the server during ``new``, ``cp`` and ``rm``, then a restart on the same data dir: no orphan
  process, no phantom row, every VM that is listed as running is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ussycode.runtime.container import ContainerRuntime
from ussycode.runtime.images import ImageStore

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``ussycode serve`` as a child process on a fixed data dir and ports (so it can be killed and restarted)."""

    def __init__(self, data: Path, keys: Path) -> None:
        self.data, self.keys = data, keys
        self.ssh_port = _free_port()
        images = os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images")
        self.env = {**os.environ, "USSYCODE_DATA_DIR": str(data), "USSYCODE_IMAGES_DIR": images,
                    "USSYCODE_SSH_ADDR": f"127.0.0.1:{self.ssh_port}", "USSYCODE_HTTP_ADDR": "127.0.0.1:0",
                    "USSYCODE_SMTP_ADDR": "127.0.0.1:0", "USSYCODE_ADMIN_ADDR": "127.0.0.1:0",
                    "USSYCODE_HTTPS_ADDR": f"127.0.0.1:{_free_port()}", "USSYCODE_TLS": "off",
                    "USSYCODE_RUNTIME": "container", "USSYCODE_DEFAULT_IMAGE": "ussyuntu-mini",
                    "USSYCODE_RATE_PER_MINUTE": "10000", "USSYCODE_RATE_BURST": "1000"}
        self.proc: asyncio.subprocess.Process | None = None
        self.log = data.parent / "serve.log"

    async def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ussycode.cli", "serve", env=self.env, cwd=ROOT, stdout=log, stderr=log)
        for _ in range(600):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.ssh_port)
                w.close()
                return
            except OSError:
                if self.proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
        raise AssertionError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 40)

    def key(self) -> Path:
        path = self.keys / "crash_ed25519"
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        return path

    def argv(self, *args: str, user: str = "lobby") -> list[str]:
        return ["ssh", "-p", str(self.ssh_port), "-i", str(self.key()), "-o", "IdentitiesOnly=yes", "-o",
                "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
                "LogLevel=ERROR", "-F", "/dev/null", "-T", f"{user}@127.0.0.1", *args]

    async def ssh(self, *args: str, user: str = "lobby", timeout: float = 120) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(*self.argv(*args, user=user), stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def settled_listing(self) -> list[dict[str, object]]:
        """``ls --json`` once no VM has an operation in flight (re-attaching VMs say ``pending: starting``)."""
        for _ in range(600):
            code, out, err = await self.ssh("ls", "--json")
            assert code == 0, err
            listing: list[dict[str, object]] = json.loads(out)
            if all(v["pending"] is None for v in listing):
                return listing
            await asyncio.sleep(0.2)
        raise AssertionError(f"operations never settled: {listing}")

    def rows(self) -> dict[str, tuple[str, str]]:
        """id -> (name, status), read from the DB file itself."""
        with sqlite3.connect(f"file:{self.data / 'ussycode.db'}?mode=ro", uri=True) as db:
            return {i: (n, s) for i, n, s in db.execute("SELECT id, name, status FROM vms")}

    def host_vms(self) -> set[str]:
        """Ids of VMs this data dir holds on the host (sidecars)."""
        return {p.stem for p in (self.data / "disks").glob("*.json")}


def vm_processes(vm_ids: set[str]) -> set[str]:
    """The VM ids among ``vm_ids`` that have at least one live process (by cgroup membership)."""
    found: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        found |= {vm_id for vm_id in vm_ids if f"/ussycode/{vm_id}" in text}
    return found


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    keys = tmp_path / "keys"
    keys.mkdir()
    srv = Serve(tmp_path / "data", keys)
    yield srv
    await srv.stop()
    # Whatever a failed test left: destroy every VM of this data dir.
    rt = ContainerRuntime(srv.data / "disks", srv.data / "run",
                          ImageStore(Path(srv.env["USSYCODE_IMAGES_DIR"])))
    for vm_id in srv.host_vms():
        try:
            await rt.destroy(vm_id)
        except Exception as exc:  # noqa: BLE001 - best effort
            print(f"cleanup of {vm_id} failed: {exc}")
    await rt.close()


async def _assert_consistent(srv: Serve, seen: set[str]) -> None:
    listing = await srv.settled_listing()
    rows = srv.rows()
    assert {name for name, _ in rows.values()} == {v["name"] for v in listing}
    assert all(status in ("running", "stopped") for _, status in rows.values()), rows  # no "creating", no error
    running_rows = {i for i, (_, status) in rows.items() if status == "running"}
    live = vm_processes(seen | srv.host_vms() | set(rows))
    assert live == running_rows, f"live processes {live} vs rows running {running_rows}"
    for vm_id in srv.host_vms():
        assert vm_id in rows, f"VM {vm_id} is on the host with no row"
    for name, status in rows.values():
        if status == "running":
            code, out, err = await srv.ssh("echo ok", user=name, timeout=60)
            assert code == 0 and out.strip() == "ok", (name, err)


async def _kill_during(srv: Serve, delay: float, *command: str) -> set[str]:
    """Run a lobby command, kill -9 the server after ``delay`` s, restart it; returns the VM ids seen at the kill."""
    client = await asyncio.create_subprocess_exec(*srv.argv(*command), stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    await asyncio.sleep(delay)
    await srv.kill9()
    seen = srv.host_vms() | set(srv.rows())
    await client.communicate()
    await srv.start()
    return seen


async def test_kill_9_during_new_cp_and_rm_then_restart_is_consistent(serve: Serve) -> None:
    await serve.start()
    assert (await serve.ssh("register", "crash"))[0] == 0
    assert (await serve.ssh("new", "--name=keep", "--disk=1"))[0] == 0
    seen: set[str] = set()
    for n, delay in enumerate((0.4, 1.0, 2.0)):
        seen |= await _kill_during(serve, delay, "new", f"--name=doomed{n}", "--disk=1")
        await _assert_consistent(serve, seen)
    for n, delay in enumerate((0.5, 1.5)):
        seen |= await _kill_during(serve, delay, "cp", "keep", f"keep-copy{n}")
        await _assert_consistent(serve, seen)
    listing = await serve.settled_listing()
    victims = [str(v["name"]) for v in listing if v["name"] != "keep"]
    if not victims:  # every copy was undone: make one to remove
        assert (await serve.ssh("cp", "keep", "victim"))[0] == 0
        victims = ["victim"]
    seen |= await _kill_during(serve, 0.3, "rm", victims[0], "--yes")
    await _assert_consistent(serve, seen)
    assert any(v["name"] == "keep" and v["status"] == "running" for v in await serve.settled_listing())


@pytest.mark.parametrize("delay", [0.1, 0.5, 1.0, 2.0])
async def test_start_killed_then_rm_leaves_nothing(serve: Serve, delay: float) -> None:
    await serve.start()
    assert (await serve.ssh("register", "impatient"))[0] == 0
    assert (await serve.ssh("new", "--name=web", "--disk=1"))[0] == 0
    assert (await serve.ssh("stop", "web"))[0] == 0
    ids = set(serve.rows())
    client = await asyncio.create_subprocess_exec(*serve.argv("start", "web"), stdin=subprocess.DEVNULL,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(delay)
    with contextlib.suppress(ProcessLookupError):  # a container VM may have started already
        client.kill()
    await client.wait()
    code, _, err = await serve.ssh("rm", "web", "--yes")
    assert code == 0, err
    assert await serve.settled_listing() == []
    assert serve.rows() == {} and serve.host_vms() == set()
    assert vm_processes(ids) == set()

"""A real server on loopback port 0, real SSH clients (OpenSSH ``ssh`` and asyncssh)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from ussycode.app import App
from ussycode.config import load_settings
from ussycode.store import vms as vms_q

SLOW_CALLBACK = 0.1  # seconds: a callback that holds the event loop longer fails the test


@pytest.fixture(autouse=True)
def loop_stalls(request: pytest.FixtureRequest) -> Iterator[list[tuple[float, str]]]:
    """Fail the test if a server callback (a task step, a timer, an I/O callback) held the event loop for more
    than SLOW_CALLBACK: asyncio's slow-callback check (``loop.slow_callback_duration``) without debug mode's
    other costs. Every ``Handle`` the loop runs is timed; a watchdog thread records where the loop's thread was
    while a callback overran, so the failure names the blocking line.

    What counts, on a shared 2-core machine where wall-clock time also measures other processes:
    - callbacks of the test's own tasks (its body, pytest-asyncio's fixture wrappers) are not the server's;
    - a server callback fails the test when it spent over SLOW_CALLBACK of CPU on the loop's thread (work
      that belongs in a thread), or over SLOW_CALLBACK of wall time blocked inside ussycode's own code (a
      blocking call: the sampled stack shows it), but not when the loop's thread only waited for the OS to
      start a worker thread or a child process (scheduling, not our code).
    """
    stalls: list[tuple[float, str]] = []
    original = asyncio.events.Handle._run
    running: dict[str, Any] = {"since": None, "thread": None, "where": None}
    done = threading.Event()

    def timed(handle: asyncio.Handle) -> None:
        running["thread"], running["where"] = threading.get_ident(), None
        cpu = time.thread_time()
        running["since"] = started = time.perf_counter()
        try:
            original(handle)
        finally:
            running["since"] = None
            took, cpu = time.perf_counter() - started, time.thread_time() - cpu
            if took > SLOW_CALLBACK and not _test_owned(handle):
                where: list[traceback.FrameSummary] = running["where"] or []
                if cpu > SLOW_CALLBACK or _blocked_in_ours(where):
                    line = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))
                    stalls.append((took, f"{_describe(handle)} (cpu {cpu * 1000:.0f} ms)\n"
                                         f"    blocked in: {line or '?'}"))

    def watchdog() -> None:
        while not done.wait(0.02):
            since, thread = running["since"], running["thread"]
            if since is not None and running["where"] is None and time.perf_counter() - since > SLOW_CALLBACK * 0.8:
                frame = sys._current_frames().get(thread)
                running["where"] = traceback.extract_stack(frame)[-8:] if frame is not None else []

    # The test process's own heap (pytest, every imported module) is not the server's: keep the collector's full
    # passes over it out of the measurement (the server freezes its start-up heap the same way).
    gc.collect()
    gc.freeze()
    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    dog = threading.Thread(target=watchdog, name="loop-watchdog", daemon=True)
    dog.start()
    try:
        yield stalls
    finally:
        asyncio.events.Handle._run = original  # type: ignore[method-assign]
        done.set()
        dog.join()
    if stalls:
        worst = "\n".join(f"  {took * 1000:.0f} ms: {what}" for took, what in sorted(stalls, reverse=True)[:5])
        pytest.fail(f"the event loop was blocked {len(stalls)} time(s) for more than "
                    f"{SLOW_CALLBACK * 1000:.0f} ms:\n{worst}")


_SCHEDULING = {("threading.py", "wait"), ("threading.py", "start"), ("subprocess.py", "_execute_child")}


def _blocked_in_ours(stack: list[traceback.FrameSummary]) -> bool:
    """The sampled stack shows the loop's thread inside ussycode's code, not waiting for the OS to start a
    thread or a process."""
    if not stack or any((Path(f.filename).name, f.name) in _SCHEDULING for f in stack[-3:]):
        return False
    return any("/ussycode/" in f.filename for f in stack)


def _describe(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = f" at {frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else ""
        return f"task {task.get_name()} {getattr(coro, '__qualname__', coro)}{where}"
    return repr(callback)


def _test_owned(handle: asyncio.Handle) -> bool:
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    if not isinstance(task, asyncio.Task):
        return False
    code = getattr(task.get_coro(), "cr_code", None)
    filename = code.co_filename if code is not None else ""
    return "/tests/" in filename or "pytest_asyncio" in filename


@dataclass
class SshResult:
    exit_status: int
    stdout: str
    stderr: str


@dataclass
class Server:
    app: App
    port: int
    data_dir: Path
    keys_dir: Path

    def key(self, name: str, key_type: str = "ed25519") -> Path:
        """A key pair made by the real ssh-keygen (cached per test)."""
        path = self.keys_dir / f"{name}_{key_type}"
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", name, "-f", str(path)], check=True)
        return path

    def ssh_argv(self, key: Path, *args: str, user: str = "lobby", tty: bool = False,
                 bind: str | None = None) -> list[str]:
        """``bind``: the loopback address to connect from (127.0.0.2…: the server sees another client address)."""
        return ["ssh", "-p", str(self.port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                *(["-b", bind] if bind else []),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-F", "/dev/null", *(["-tt"] if tty else ["-T"]), f"{user}@127.0.0.1", *args]

    async def ssh(self, key: Path, *args: str, user: str = "lobby", stdin: bytes = b"",
                  timeout: float = 120, bind: str | None = None) -> SshResult:
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv(key, *args, user=user, bind=bind), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        assert proc.returncode is not None
        return SshResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    async def register(self, name: str, bind: str | None = None) -> Path:
        key = self.key(name)
        r = await self.ssh(key, "register", name, bind=bind)
        assert r.exit_status == 0, r
        return key

    async def kill_vm_and_wait_stopped(self, key: Path, name: str, timeout: float = 20) -> bool:
        """Kill the VM's main process behind the server's back; True once `ls` says it is stopped."""
        vm = await self.app.services.vms.by_name(name)  # type: ignore[union-attr]
        assert vm is not None and vm.runtime_state.get("pid")
        os.kill(int(vm.runtime_state["pid"]), signal.SIGKILL)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            listing = json.loads((await self.ssh(key, "ls", "--json")).stdout)
            if any(v["name"] == name and v["status"] == "stopped" for v in listing):
                return True
            await asyncio.sleep(0.5)
        return False

    async def connect(self, key: Path | asyncssh.SSHKey, user: str = "lobby", bind: str | None = None,
                      **kw: Any) -> asyncssh.SSHClientConnection:
        client_keys = [key] if isinstance(key, asyncssh.SSHKey) else [str(key)]
        if bind:
            kw["local_addr"] = (bind, 0)
        return await asyncssh.connect("127.0.0.1", self.port, username=user, client_keys=client_keys,
                                      known_hosts=None, agent_path=None, config=[], **kw)


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a server started on it later cannot lose it meanwhile
    to an outgoing connection (those take their local ports from that range)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(max(1024, low // 2), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_app(data_dir: Path, runtime_obj: Any = None, **overrides: Any) -> App:
    images_dir = Path(os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images"))
    values: dict[str, Any] = {"data_dir": str(data_dir), "images_dir": str(images_dir), "ssh_addr": "127.0.0.1:0",
                              "http_addr": "127.0.0.1:0", "smtp_addr": "127.0.0.1:0", "admin_addr": "127.0.0.1:0",
                              "https_addr": f"127.0.0.1:{free_port()}", "tls": "off",
                              "runtime": "container", "default_image": "ussyuntu-mini"}
    settings = load_settings(**{**values, **overrides})
    return App(settings, runtime=runtime_obj)


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    apps: list[App] = []
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()

    async def start(data_dir: Path | None = None, *, reattached: bool = True, runtime: Any = None,
                    **overrides: Any) -> Server:
        """A server on ``data_dir``; with ``reattached`` (the default), once its VMs are back. ``runtime``: a
        Runtime object to use instead of the one the settings name (the fake one, for control-plane tests)."""
        if shutil.which("ssh") is None:
            pytest.skip("OpenSSH client not installed (apt-get install openssh-client)")
        if isinstance(runtime, str):  # a runtime by name is a setting
            overrides["runtime"], runtime = runtime, None
        app = make_app(data_dir or tmp_path / "data", runtime, **overrides)
        await app.start()
        apps.append(app)
        if reattached:
            await app.reattached()
        assert app.ssh_port is not None
        return Server(app, app.ssh_port, app.settings.data_dir, keys_dir)

    yield start
    # Leave no VM behind, whatever the test did: destroy what the last server knows, then stop the servers.
    live = [a for a in apps if a.services is not None and not a._stopped.is_set()]
    if live:
        services = live[-1].services
        assert services is not None
        for vm in await services.store.read(vms_q.all_vms):
            try:
                await services.vms.runtime.destroy(vm.id)
            except Exception as exc:  # noqa: BLE001 - best effort; report but keep cleaning
                print(f"cleanup: destroying {vm.name} failed: {exc}")
    for app in apps:
        if not app._stopped.is_set():
            await app.stop()


@pytest.fixture
async def server(server_factory: Callable[..., Any]) -> Server:
    srv: Server = await server_factory()
    return srv

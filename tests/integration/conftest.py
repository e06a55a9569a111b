"""A real server on loopback port 0, real SSH clients (OpenSSH ``ssh`` and asyncssh)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from ussycode.app import App
from ussycode.config import load_settings
from ussycode.store import vms as vms_q


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_app(data_dir: Path, **overrides: Any) -> App:
    images_dir = Path(os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images"))
    values: dict[str, Any] = {"data_dir": str(data_dir), "images_dir": str(images_dir), "ssh_addr": "127.0.0.1:0",
                              "http_addr": "127.0.0.1:0", "https_addr": f"127.0.0.1:{free_port()}", "tls": "off",
                              "runtime": "container", "default_image": "ussyuntu-mini"}
    settings = load_settings(**{**values, **overrides})
    return App(settings)


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    apps: list[App] = []
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()

    async def start(data_dir: Path | None = None, **overrides: Any) -> Server:
        if shutil.which("ssh") is None:
            pytest.skip("OpenSSH client not installed (apt-get install openssh-client)")
        app = make_app(data_dir or tmp_path / "data", **overrides)
        await app.start()
        apps.append(app)
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

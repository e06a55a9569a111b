"""The HTTPS entry: Caddy (managed or attached), port bridges and the routes the DB says should exist.

The DB is the truth. :meth:`RouteService.desired` builds, from every VM, its routes:

- ``<vm>.<domain>`` -> bridge (VM, 8080), public when port 8080 is public, else through forward-auth;
- ``<port>-<vm>.<domain>`` for each public port -> bridge (VM, port), public;
- ``<port>-<vm>.<domain>`` for every other port 3000-9999 -> one private regexp route (forward-auth starts the
  bridge on demand);
- each verified custom domain -> bridge (VM, 8080), with the VM URL's access rules;

plus the apex (-> the app server). Routes exist for stopped VMs too, so their URL answers "not answering"
instead of "no such VM"; bridges run only for running VMs. :meth:`RouteService.reconcile` makes Caddy and the
bridges match: at start-up (so a restart brings every route back without touching a VM), on every VM or sharing
event (before the command that caused it returns), and on a timer (repairs drift, e.g. a restarted Caddy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import secrets
from typing import Any

from ussycode.config import Settings, parse_addr
from ussycode.errors import UssyError
from ussycode.proxy.bridge import BridgeManager
from ussycode.proxy.caddy import CaddyAdmin, ReconcileResult
from ussycode.proxy.manager import ExternalCaddy, ManagedCaddy
from ussycode.proxy.routes import (
    JSON,
    Route,
    RouteKind,
    ServerSettings,
    TlsMode,
    build_any_port_route,
    build_catchall,
    build_config,
    build_route,
    build_server,
    build_tls_app,
)
from ussycode.services.container import Services
from ussycode.services.events import VmEvent
from ussycode.services.sessions import SessionService, load_or_create_secret
from ussycode.services.shares import MAIN_PORT, ShareService
from ussycode.store import shares as shareq
from ussycode.store import vms as vmq
from ussycode.tasks import TaskGroup
from ussycode.types import VmStatus

log = logging.getLogger(__name__)

AUTH_PATH = "/__ussycode/forward-auth"
ASK_PATH = "/__ussycode/tls-ask"
RECONCILE_INTERVAL = 30.0


def forward_auth_key(key: bytes) -> str:
    """The secret Caddy passes to the forward-auth endpoint (so nobody else can call it with forged headers)."""
    return hmac.new(key, b"forward-auth", hashlib.sha256).hexdigest()[:40]


class RouteService:
    """Desired routes from the DB, applied to Caddy and the bridges."""

    def __init__(self, services: Services, bridges: BridgeManager, app_addr: str, auth_key: str) -> None:
        self.services = services
        self.auth_key = auth_key
        self.settings: Settings = services.settings
        self.bridges = bridges
        self.app_addr = app_addr
        self.auth_url = f"http://{app_addr}{AUTH_PATH}?k={auth_key}"
        # Made anew at each start: Caddy sends it with the client's address (hygiene.client_address_headers).
        self.proxy_key = secrets.token_urlsafe(24)
        self.admin: CaddyAdmin | None = None
        self._lock = asyncio.Lock()
        self.last_result: ReconcileResult | None = None

    def _dial(self, vm_id: str, port: int) -> str:
        return self.bridges.dial_address(vm_id, port)

    async def _state(self) -> tuple[list[Any], dict[str, set[int]], dict[str, list[str]]]:
        def read(c: Any) -> tuple[list[Any], dict[str, set[int]], dict[str, list[str]]]:
            return vmq.all_vms(c), shareq.public_ports_by_vm(c), shareq.verified_cnames_by_vm(c)

        return await self.services.store.read(read)

    async def desired(self) -> tuple[list[JSON], set[tuple[str, int]]]:
        """(Caddy routes, wanted bridges) from the DB."""
        domain = self.settings.domain
        vms, public, cnames = await self._state()
        app, key = self.app_addr, self.proxy_key
        routes: list[JSON] = [build_route(Route(RouteKind.APEX, domain, app, public=True, proxy_key=key))]
        wanted: set[tuple[str, int]] = set()
        for vm in vms:
            ports = public.get(vm.id, set())
            host = f"{vm.name}.{domain}"
            routes.append(build_route(Route(RouteKind.VM, host, self._dial(vm.id, MAIN_PORT),
                                            public=MAIN_PORT in ports, auth_url=self.auth_url, app=app,
                                            proxy_key=key)))
            port_hosts = []
            for port in sorted(ports - {MAIN_PORT}):
                port_host = f"{port}-{host}"
                port_hosts.append(port_host)
                routes.append(build_route(Route(RouteKind.PORT, port_host, self._dial(vm.id, port), public=True,
                                                app=app, proxy_key=key)))
            prefix = self._dial(vm.id, MAIN_PORT).removesuffix(f"{MAIN_PORT}.sock")
            routes.append(build_any_port_route(host, prefix, self.auth_url, app, tuple(port_hosts), key))
            for cname in cnames.get(vm.id, []):
                routes.append(build_route(Route(RouteKind.CNAME, cname, self._dial(vm.id, MAIN_PORT),
                                                public=MAIN_PORT in ports, auth_url=self.auth_url, app=app,
                                                proxy_key=key)))
            if vm.status is VmStatus.RUNNING:
                wanted.add((vm.id, MAIN_PORT))
                wanted.update((vm.id, p) for p in ports)
        running = {vm.id for vm in vms if vm.status is VmStatus.RUNNING}
        # Bridges forward-auth started on demand stay while their VM runs.
        wanted.update(key for key in self.bridges.active() if key[0] in running)
        return routes, wanted

    async def reconcile(self) -> ReconcileResult | None:
        async with self._lock:
            routes, wanted = await self.desired()
            await self.bridges.sync(wanted)
            if self.admin is None:
                return None
            self.last_result = await self.admin.reconcile(routes, build_catchall())
            return self.last_result

    async def ensure_bridge(self, vm_id: str, port: int) -> None:
        await self.bridges.ensure(vm_id, port)

    async def on_event(self, event: VmEvent) -> None:
        try:
            await self.reconcile()
        except UssyError as exc:
            log.error("routes not updated after %s %s: %s", event.kind, event.name, exc)


class HttpsEntry:
    """Owns the sharing and session services, the bridges, Caddy and the route service (App wires it)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        s = services.settings
        self.key = load_or_create_secret(s.data_dir / "web_secret")
        services.shares = ShareService(services.store, services.vms, services.events)
        services.sessions = SessionService(services.store, self.key)
        self.tasks = TaskGroup("https")
        self.caddy: ManagedCaddy | ExternalCaddy | None = None
        self.routes: RouteService | None = None
        self.error: str = ""

    def server_settings(self, http_port: int) -> ServerSettings:
        s = self.services.settings
        host, _ = parse_addr(s.http_addr)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        tls = TlsMode(str(s.tls))
        ask = f"http://{host}:{http_port}{ASK_PATH}" if tls is not TlsMode.OFF else ""
        return ServerSettings(domain=s.domain, https_addr=s.https_addr, http_addr=f"{host}:{http_port}", tls=tls,
                              acme_email=s.acme_email, ask_url=ask)

    async def start(self, http_port: int) -> None:
        """Bridges and routes from the DB, then Caddy with them. A Caddy that cannot start is logged, and the
        rest of the server keeps running (SSH, API); the error stays in ``self.error``."""
        s = self.services.settings
        ss = self.server_settings(http_port)
        bridges = BridgeManager(self.services.vms.runtime, s.run_dir)
        self.routes = routes = RouteService(self.services, bridges, ss.http_addr, forward_auth_key(self.key))
        ss = dataclasses.replace(ss, proxy_key=routes.proxy_key)
        self.services.routes = routes
        desired, wanted = await routes.desired()
        await bridges.sync(wanted)
        try:
            if s.caddy_admin:
                apps: JSON = {}
                tls_app = build_tls_app(ss)
                if tls_app is not None:
                    apps = {"tls": tls_app, "pki": {"certificate_authorities": {"local": {"install_trust": False}}}}
                self.caddy = ExternalCaddy(s.caddy_admin, build_server(ss), apps)
            else:
                config = build_config(ss)
                config["apps"]["http"]["servers"]["ussycode"]["routes"][1:-1] = desired[1:]
                self.caddy = ManagedCaddy(s.caddy_dir, config)
            routes.admin = await self.caddy.start()
            await routes.reconcile()
        except UssyError as exc:
            self.error = str(exc)
            log.error("the HTTPS entry (Caddy) is not running: %s", exc)
        self.services.events.subscribe(routes.on_event)
        self.tasks.spawn(self._timer(), "routes-reconcile")

    async def _timer(self) -> None:
        assert self.routes is not None
        sessions = self.services.sessions
        ticks = 0
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            ticks += 1
            try:
                await self.routes.reconcile()
                if ticks % 120 == 1 and sessions is not None:
                    await sessions.purge_expired()
            except Exception:
                log.exception("periodic route reconcile failed")

    async def stop(self) -> None:
        await self.tasks.close()
        if self.caddy is not None:
            await self.caddy.stop()
        if self.routes is not None:
            await self.routes.bridges.close()

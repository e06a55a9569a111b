"""The HTTPS entry: Caddy (managed or attached) with a static config, the forwarders, and the routing table.

Caddy's config never changes per VM (:mod:`ussycode.proxy.front`): a route change must never cut anyone's
in-flight request. The DB is the truth; :meth:`RouteService.reconcile` derives from it

- the forwarders to run (:class:`~ussycode.proxy.bridge.BridgeManager`): port 8080 and every public port of each
  running VM, plus the ports forward-auth opened on demand while their VM runs;
- the public hosts served without asking the app server (:class:`~ussycode.proxy.hosts.PublicHosts`, a listener
  each, opened when forward-auth first serves the host as public): ``<vm>.<domain>`` and the VM's verified custom
  domains when port 8080 is public, ``<port>-<vm>.<domain>`` for each other public port — running VMs only (a
  stopped VM's URL goes through forward-auth, which answers a page).

Signed-in visitors' allows are kept as grants Caddy checks itself (:class:`~ussycode.proxy.grants.Grants`,
removed by any write to the database).

It runs at start-up, on every VM or sharing event (before the command that caused it returns) and on a timer.
Private URLs, unknown hosts and stopped VMs are answered per request by forward-auth (``api/auth_endpoint.py``), which
names the upstream for Caddy. A watchdog restarts a managed Caddy that died (``kill -9``) within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ussycode.config import Settings, parse_addr
from ussycode.errors import UssyError
from ussycode.proxy import links
from ussycode.proxy.bridge import BridgeManager
from ussycode.proxy.front import FrontSettings, build_front_apps, build_front_config, build_front_server
from ussycode.proxy.grants import Grants
from ussycode.proxy.hosts import PublicHosts
from ussycode.proxy.links import RoutedHost
from ussycode.proxy.manager import CaddyState, ExternalCaddy, ManagedCaddy
from ussycode.proxy.routes import ServerSettings, TlsMode
from ussycode.services.container import Services
from ussycode.services.events import VmEvent
from ussycode.services.sessions import SessionService, WebSession, load_or_create_secret
from ussycode.services.shares import MAIN_PORT, ShareService
from ussycode.store import shares as shareq
from ussycode.store import vms as vmq
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)

AUTH_PATH = "/__ussycode/forward-auth"
ASK_PATH = "/__ussycode/tls-ask"
RECONCILE_INTERVAL = 30.0
WATCH_INTERVAL = 0.25


def forward_auth_key(key: bytes) -> str:
    """The secret Caddy passes to the forward-auth endpoint (so nobody else can call it with forged headers)."""
    return hmac.new(key, b"forward-auth", hashlib.sha256).hexdigest()[:40]


class RouteService:
    """The routing table from the DB, applied to the forwarders and the public-host files (never to Caddy)."""

    def __init__(self, services: Services, bridges: BridgeManager, hosts: PublicHosts, app_addr: str,
                 auth_key: str, auth_addr: str = "") -> None:
        self.services = services
        self.auth_key = auth_key
        self.settings: Settings = services.settings
        self.bridges = bridges
        self.hosts = hosts
        self.app_addr = app_addr
        # forward-auth: the lean listener (api/gate.py) when the app runs one, else the app server's endpoint
        self.auth_url = f"http://{auth_addr or app_addr}{AUTH_PATH}?k={auth_key}"
        # Made anew at each start: Caddy sends it with the client's address (hygiene.client_address_headers).
        self.proxy_key = secrets.token_urlsafe(24)
        self.health: Callable[[], dict[str, Any]] | None = None  # the HTTPS entry's report, for /health
        self.grants: Grants | None = None
        self._lock = asyncio.Lock()
        # Coalescing: each request to reconcile takes a number; a pass that began after a request covers it.
        self._requested = 0
        self._covered = 0
        self.tasks = TaskGroup("routes")
        self._ports: dict[tuple[str, int], RoutedHost] = {}  # routed VM ports (grants dial them)
        self._making: dict[tuple[str, int], asyncio.Task[str | None]] = {}

    async def _state(self) -> tuple[dict[str, str], dict[str, set[int]], dict[str, list[str]]]:
        def read(c: Any) -> tuple[dict[str, str], dict[str, set[int]], dict[str, list[str]]]:
            return vmq.running_names(c), shareq.public_ports_by_vm(c), shareq.verified_cnames_by_vm(c)

        return await self.services.store.read(read)

    async def desired(self) -> tuple[set[tuple[str, int]], dict[str, tuple[str, int]]]:
        """(wanted forwarders, public host -> (VM id, port)) from the DB."""
        domain = self.settings.domain
        running, public, cnames = await self._state()
        wanted: set[tuple[str, int]] = set()
        hosts: dict[str, tuple[str, int]] = {}
        for vm_id, name in running.items():
            ports = public.get(vm_id, set())
            wanted.add((vm_id, MAIN_PORT))
            wanted.update((vm_id, p) for p in ports)
            host = f"{name}.{domain}"
            for port in ports:
                hosts[host if port == MAIN_PORT else f"{port}-{host}"] = (vm_id, port)
            if MAIN_PORT in ports:
                for cname in cnames.get(vm_id, []):
                    hosts[cname] = (vm_id, MAIN_PORT)
        # Forwarders forward-auth started on demand stay while their VM runs.
        wanted.update(key for key in self.bridges.active() if key[0] in running)
        return wanted, hosts

    async def reconcile(self) -> None:
        """Make forwarders and public hosts match the DB. Returns once a pass that began after this call has
        finished; a burst of calls (20 VMs starting at once) shares passes instead of running one each, since a
        pass reads the whole routing table anyway."""
        self._requested += 1
        mine = self._requested
        async with self._lock:
            if self._covered >= mine:
                return  # a pass that started after our request has finished meanwhile
            covers = self._requested
            wanted, hosts = await self.desired()
            await self.bridges.sync(wanted)
            await self.hosts.sync(hosts, self.bridges)
            await self._sync_ports({vm_id for vm_id, _ in wanted})
            self._covered = covers

    def public_served(self, host: str) -> None:
        """Forward-auth let ``host`` through as public: give it a listener of its own (in the background), so
        the following requests take the fast path."""
        if self.hosts.request(host):
            self.tasks.spawn(self._reconcile_or_log(f"{host} was first served"), "public-listener")

    async def _reconcile_or_log(self, after: str) -> None:
        try:
            await self.reconcile()
        except (UssyError, OSError) as exc:
            log.error("routes not updated after %s: %s", after, exc)

    async def ensure_bridge(self, vm_id: str, port: int) -> str:
        """Start the VM port's forwarder if needed; its Caddy dial address."""
        return (await self.bridges.ensure(vm_id, port)).dial

    async def grant(self, session: WebSession, host: str, access: str, vm_id: str, port: int, *, generation: int,
                    until: float) -> str | None:
        """Forward-auth let this signed-in request through (decided on what the DB said at ``generation``):
        keep it as a grant until ``until`` (monotonic). Returns the grant cookie's value (None: no grant)."""
        grants = self.grants
        if grants is None:
            return None
        addr = ""
        if self.hosts.links is not None:  # Caddy dials the VM port's routed address (none: no grant)
            addr = await self.routed_port(vm_id, port) or ""
            if not addr:
                return None
        value = grants.value(session=session.id_hash, host=host, access=access, user_id=session.user_id,
                             handle=session.handle, email=session.email, vm_id=vm_id, port=port, addr=addr)
        return value if value is not None and grants.admit(host, value, generation, until) else None

    async def routed_port(self, vm_id: str, port: int) -> str | None:
        """The VM port's routed address (:mod:`ussycode.proxy.links`), made on first use (once, however many
        requests ask at the same time); None if it cannot be routed."""
        routed = self._ports.get((vm_id, port))
        if routed is not None and routed.alive:
            return routed.addr
        making = self._making.get((vm_id, port))
        if making is None:
            making = self._making[(vm_id, port)] = self.tasks.spawn(self._route_port(vm_id, port), "routed-port")
        return await asyncio.shield(making)

    async def _route_port(self, vm_id: str, port: int) -> str | None:
        links = self.hosts.links
        try:
            netns = await self.bridges.netns_for(vm_id, port, forwarder=False)
            if links is None or netns is None:
                return None
            old = self._ports.pop((vm_id, port), None)
            if old is not None:
                await old.close()
            routed = self._ports[(vm_id, port)] = await links.open(f"{vm_id}:{port}", netns, port, listed=False)
            return routed.addr
        except (UssyError, OSError) as exc:
            log.warning("VM %s port %d not routed (%s): its visitors go through forward-auth", vm_id, port, exc)
            return None
        finally:
            self._making.pop((vm_id, port), None)

    async def _sync_ports(self, running: set[str]) -> None:
        """Routed VM ports of VMs that stopped (or whose link went) are unrouted."""
        for key, routed in sorted(self._ports.items()):
            if key[0] not in running or not routed.alive:
                del self._ports[key]
                await routed.close()

    async def close_ports(self) -> None:
        await self._sync_ports(set())

    async def on_event(self, event: VmEvent) -> None:
        await self._reconcile_or_log(f"{event.kind} {event.name}")


class HttpsEntry:
    """Owns the sharing and session services, the forwarders, Caddy and the route service (App wires it)."""

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
        self.restarts = 0

    def server_settings(self, http_port: int) -> ServerSettings:
        s = self.services.settings
        host, _ = parse_addr(s.http_addr)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        tls = TlsMode(str(s.tls))
        ask = f"http://{host}:{http_port}{ASK_PATH}" if tls is not TlsMode.OFF else ""
        return ServerSettings(domain=s.domain, https_addr=s.https_addr, http_addr=f"{host}:{http_port}", tls=tls,
                              acme_email=s.acme_email, ask_url=ask)

    async def start(self, http_port: int, auth_port: int | None = None) -> None:
        """Forwarders and public hosts from the DB, then Caddy with its static config (forward-auth on
        ``auth_port`` when given, else on the app server). A Caddy that cannot start is logged, and the rest of
        the server keeps running (SSH, API); the error stays in ``self.error`` and the watchdog keeps trying."""
        s = self.services.settings
        ss = self.server_settings(http_port)
        bridges = BridgeManager(self.services.vms.runtime, s.run_dir)
        front_links = await self._front_links(Path(s.run_dir) / "front" / "routed")
        hosts = PublicHosts(Path(s.run_dir) / "front", relative=not s.caddy_admin, links=front_links)
        auth_addr = ss.http_addr.rpartition(":")[0] + f":{auth_port}" if auth_port else ""
        self.routes = routes = RouteService(self.services, bridges, hosts, ss.http_addr, forward_auth_key(self.key),
                                            auth_addr)
        ss = dataclasses.replace(ss, proxy_key=routes.proxy_key)
        self.services.routes = routes
        routes.health = self.health
        await routes.reconcile()
        routes.grants = grants = Grants(hosts.base / "grants", secrets.token_bytes(32),
                                        lambda: self.services.store.generation)
        grants.reset()
        self.services.store.on_write.append(grants.wipe)
        bridges_dir = "../" + bridges.dir.name if not s.caddy_admin else str(bridges.dir)
        front = FrontSettings(routes.auth_url, hosts.dial_template(), str(grants.root.resolve()), bridges_dir,
                              routed=front_links is not None)
        if s.caddy_admin:
            self.caddy = ExternalCaddy(s.caddy_admin, build_front_server(ss, front), build_front_apps(ss))
        else:
            hosts.base.mkdir(parents=True, exist_ok=True)
            run_dir = Path(await asyncio.to_thread(os.path.realpath, s.run_dir))
            wrap = (lambda argv: links.caddy_argv(front_links.hosts_file, run_dir, argv)) if front_links else None
            self.caddy = ManagedCaddy(s.caddy_dir, build_front_config(ss, front), cwd=hosts.base, wrap=wrap,
                                      debug_log=s.log_level == "DEBUG")
        try:
            await self.caddy.start()
        except UssyError as exc:
            self.error = str(exc)
            log.error("the HTTPS entry (Caddy) is not running: %s", exc)
        self.services.events.subscribe(routes.on_event)
        self.tasks.spawn(self._timer(), "routes-reconcile")
        self.tasks.spawn(self._watch_caddy(), "caddy-watchdog")

    async def _front_links(self, base: Path) -> links.FrontLinks | None:
        """Routed public hosts (:mod:`ussycode.proxy.links`) for a Caddy this server starts, when the host allows
        them; otherwise (an attached Caddy, no root, a tool missing, set-up refused) public hosts are sockets."""
        if self.services.settings.caddy_admin or not links.available():
            return None

        def caddy_pid() -> int | None:
            return self.caddy.pid if isinstance(self.caddy, ManagedCaddy) and self.caddy.alive else None

        front_links = links.FrontLinks(base, caddy_pid)
        try:
            await front_links.setup()
        except UssyError as exc:
            log.warning("public hosts are served through sockets: routed hosts could not be set up: %s", exc)
            return None
        return front_links

    @property
    def state(self) -> str:
        """``running``, ``restarting`` (it died and is being brought back) or ``down``."""
        caddy = self.caddy
        if caddy is None or caddy.state is CaddyState.NEW:
            return "down"
        if caddy.state is CaddyState.RUNNING and caddy.alive:
            return "running"
        return "restarting" if caddy.state is not CaddyState.FAILED else "down"

    def health(self) -> dict[str, Any]:
        """What ``/health`` reports about the HTTPS entry."""
        caddy = self.caddy
        report: dict[str, Any] = {"state": self.state, "restarts": self.restarts}
        if isinstance(caddy, ManagedCaddy):
            report["managed"] = True
            report["pid"] = caddy.pid
        elif caddy is not None:
            report["managed"] = False
            report["admin"] = caddy.admin_address
        if self.error:
            report["error"] = self.error.splitlines()[0][:300]
        return report

    async def _watch_caddy(self) -> None:
        """Bring a dead managed Caddy back (same static config: nothing to re-apply); re-attach to an external
        one that lost our server (it restarted without it)."""
        delay = WATCH_INTERVAL
        while True:
            caddy = self.caddy
            await asyncio.sleep(delay)
            if caddy is None:
                continue
            try:
                if caddy.state is CaddyState.RUNNING and caddy.alive:
                    if isinstance(caddy, ExternalCaddy):
                        await caddy.check()
                    delay = WATCH_INTERVAL
                    continue
                log.error("the HTTPS entry (Caddy) is down; restarting it")
                await caddy.restart()
                self.restarts += 1
                self.error = ""
                log.info("the HTTPS entry (Caddy) is back")
                delay = WATCH_INTERVAL
            except UssyError as exc:
                self.error = str(exc)
                log.error("Caddy restart failed (retrying): %s", exc)
                delay = min(delay * 2, 10.0)

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
            if self.routes.grants is not None:
                with contextlib.suppress(ValueError):
                    self.services.store.on_write.remove(self.routes.grants.wipe)
                self.routes.grants.close()
            await self.routes.tasks.close()
            await self.routes.bridges.close()
            await self.routes.hosts.clear()
            await self.routes.close_ports()

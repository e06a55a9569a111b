"""Thin client for Caddy's admin API (httpx): load a config, add/replace/delete routes by ``@id``, reconcile.

We only ever touch routes whose ``@id`` starts with ``ussycode-`` in our server; foreign routes (and foreign
servers) are left alone. New routes go right before our catch-all so it stays last. Every change is checked
afterwards (``GET /id/<id>`` returns what we sent) with a short backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ussycode.errors import RuntimeFailure
from ussycode.proxy.routes import CATCHALL_ID, JSON, ROUTE_ID_PREFIX, SERVER_NAME

log = logging.getLogger(__name__)


@dataclass
class ReconcileResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def admin_transport(admin: str) -> tuple[str, httpx.AsyncHTTPTransport | None]:
    """Map an admin address (``unix//path.sock``, ``http://127.0.0.1:2019``, ``127.0.0.1:2019``) to a base URL
    and transport. Over a unix socket Caddy (2.6) only accepts an empty Host header, which the client sends."""
    if admin.startswith("unix/"):
        return "http://localhost", httpx.AsyncHTTPTransport(uds=admin[len("unix/") :], verify=False)  # no TLS here:
        # and no CA bundle loaded on the event loop (~100 ms)
    if admin.startswith(("http://", "https://")):
        return admin.rstrip("/"), None
    return f"http://{admin}", None


class CaddyAdmin:
    """A Caddy admin API endpoint; ``server`` is the name of our HTTP server in ``apps.http.servers``."""

    def __init__(self, admin: str, *, server: str = SERVER_NAME, timeout: float = 10.0) -> None:
        self.admin = admin
        self.server = server
        base_url, transport = admin_transport(admin)
        headers = {"Host": ""} if admin.startswith("unix/") else {}
        self._client = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout, headers=headers)
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def _routes_path(self) -> str:
        return f"/config/apps/http/servers/{self.server}/routes"

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            kwargs: dict[str, Any] = {}
            if body is not None:
                kwargs["content"] = json.dumps(body)
                kwargs["headers"] = {"Content-Type": "application/json"}
            resp = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RuntimeFailure(
                "the HTTPS proxy (Caddy) is not reachable",
                log_message=f"Caddy admin {self.admin} {method} {path}: {exc!r}",
                evidence=repr(exc),
            ) from exc
        if resp.status_code >= 400:
            raise RuntimeFailure(
                "the HTTPS proxy (Caddy) refused a configuration change",
                log_message=f"Caddy admin {method} {path} -> {resp.status_code}: {resp.text.strip()}",
                evidence=f"{method} {path} -> {resp.status_code}: {resp.text.strip()}",
            )
        if not resp.content:
            return None
        return resp.json()

    async def ping(self) -> bool:
        """True if the admin API answers."""
        try:
            resp = await self._client.get("/config/")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def load(self, config: JSON) -> None:
        """Replace Caddy's whole config (managed Caddy only: this drops anything else it had)."""
        await self._request("POST", "/load", config)

    async def get_config(self, path: str = "") -> Any:
        return await self._request("GET", "/config/" + path.lstrip("/"))

    async def ensure_server(self, server: JSON, apps: JSON | None = None, *, replace: bool = False) -> None:
        """For an existing (attached) Caddy: create our server (and the ``tls``/``pki`` apps we need) if
        missing, keeping everything else; ``replace`` also overwrites our server if it differs. Other servers
        and existing apps of the same name are left as they are."""
        async with self._lock:
            config = await self.get_config() or {}
            all_apps = config.setdefault("apps", {})
            servers = all_apps.setdefault("http", {}).setdefault("servers", {})
            changed = False
            if self.server not in servers or (replace and _canonical(servers[self.server]) != _canonical(server)):
                servers[self.server] = server
                changed = True
            for name, app in (apps or {}).items():
                if name not in all_apps:
                    all_apps[name] = app
                    changed = True
            if changed:
                await self._request("POST", "/load", config)

    async def routes(self) -> list[JSON]:
        """Every route of our server, ours and foreign, in order."""
        result = await self._request("GET", self._routes_path)
        return list(result or [])

    async def our_routes(self) -> dict[str, JSON]:
        """Our routes (``@id`` prefixed ``ussycode-``) by id, the catch-all excluded."""
        return {
            r["@id"]: r
            for r in await self.routes()
            if str(r.get("@id", "")).startswith(ROUTE_ID_PREFIX) and r.get("@id") != CATCHALL_ID
        }

    async def get_route(self, route_id: str) -> JSON | None:
        try:
            result: JSON | None = await self._request("GET", f"/id/{route_id}")
        except RuntimeFailure:
            return None
        return result

    async def _insert(self, route: JSON) -> None:
        current = await self.routes()
        index = next((i for i, r in enumerate(current) if r.get("@id") == CATCHALL_ID), len(current))
        # PUT on an array index inserts at that index; POST on the array appends.
        if index < len(current):
            await self._request("PUT", f"{self._routes_path}/{index}", route)
        else:
            await self._request("POST", self._routes_path, route)

    async def _wait_live(self, route_id: str, expected: JSON | None, within: float = 3.0) -> None:
        delay, waited = 0.02, 0.0
        want = None if expected is None else _canonical(expected)
        while True:
            got = await self.get_route(route_id)
            if (None if got is None else _canonical(got)) == want:
                return
            if waited >= within:
                raise RuntimeFailure(
                    "the HTTPS proxy did not apply a route change",
                    evidence=f"route {route_id}: expected {want}, Caddy has {got}",
                )
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.5)

    async def put_route(self, route: JSON) -> str:
        """Add or replace one of our routes (by its ``@id``); returns "added", "replaced" or "unchanged"."""
        route_id = route["@id"]
        async with self._lock:
            current = await self.get_route(route_id)
            if current is not None and _canonical(current) == _canonical(route):
                return "unchanged"
            if current is None:
                await self._insert(route)
                outcome = "added"
            else:
                await self._request("PATCH", f"/id/{route_id}", route)
                outcome = "replaced"
            await self._wait_live(route_id, route)
            return outcome

    async def delete_route(self, route_id: str) -> bool:
        """Remove one of our routes; False if it was not there."""
        if not route_id.startswith(ROUTE_ID_PREFIX):
            raise ValueError(f"refusing to delete a route that is not ours: {route_id}")
        async with self._lock:
            if await self.get_route(route_id) is None:
                return False
            await self._request("DELETE", f"/id/{route_id}")
            await self._wait_live(route_id, None)
            return True

    async def reconcile(self, desired: Sequence[JSON], catchall: JSON | None = None) -> ReconcileResult:
        """Make our routes exactly ``desired``: add missing, replace changed, remove stale ``ussycode-`` ones.

        Foreign routes are never touched. ``catchall`` (if given) is ensured and kept last among our routes.
        """
        result = ReconcileResult()
        want = {r["@id"]: r for r in desired}
        if len(want) != len(desired):
            raise ValueError("duplicate @id in desired routes")
        async with self._lock:
            routes = await self.routes()
            have = {
                r["@id"]: r
                for r in routes
                if str(r.get("@id", "")).startswith(ROUTE_ID_PREFIX) and r.get("@id") != CATCHALL_ID
            }
            if catchall is not None:
                existing = next((r for r in routes if r.get("@id") == CATCHALL_ID), None)
                if existing is None:
                    await self._request("POST", self._routes_path, catchall)
                    result.added.append(CATCHALL_ID)
                elif _canonical(existing) != _canonical(catchall):
                    await self._request("PATCH", f"/id/{CATCHALL_ID}", catchall)
                    result.replaced.append(CATCHALL_ID)
            for route_id in sorted(set(have) - set(want)):
                await self._request("DELETE", f"/id/{route_id}")
                result.removed.append(route_id)
            for route_id, route in want.items():
                if route_id not in have:
                    await self._insert(route)
                    result.added.append(route_id)
                elif _canonical(have[route_id]) != _canonical(route):
                    await self._request("PATCH", f"/id/{route_id}", route)
                    result.replaced.append(route_id)
            for route_id in result.added + result.replaced:
                await self._wait_live(route_id, want.get(route_id, catchall))
            for route_id in result.removed:
                await self._wait_live(route_id, None)
        if result.changed:
            log.info(
                "caddy routes reconciled: +%d ~%d -%d",
                len(result.added),
                len(result.replaced),
                len(result.removed),
            )
        return result

"""The metadata service a VM reaches at ``http://169.254.169.254/``.

Each running VM gets its own listener, made by the runtime inside that VM's network namespace
(:meth:`Runtime.open_listener`) and served by this process: who is asking is known from which listener took the
connection, never from anything the guest sends, so a VM cannot read another VM's metadata.

Endpoints (GET, read-only, JSON unless noted): ``/`` (the VM: name, domain, URL, owner, image, sizes, env) and
``/hostname`` (plain text). Requests are parsed with h11, bounded in size and time, and answered with
``Connection: close``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import sqlalchemy as sa

from ussycode.runtime.netns import METADATA_V4
from ussycode.services.container import Services
from ussycode.services.events import VmEvent
from ussycode.store import vms as vmq
from ussycode.store.schema import iso
from ussycode.store.users import by_id as user_by_id
from ussycode.types import VmStatus

log = logging.getLogger(__name__)
PORT = 80
MAX_REQUEST = 16 * 1024
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 25\r\n"
               b"Connection: close\r\n\r\n{\"error\": \"bad request\"}\n")
REQUEST_TIMEOUT = 10.0


class MetadataService:
    def __init__(self, services: Services, host: str = METADATA_V4, port: int = PORT) -> None:
        self.services = services
        self.host = host
        self.port = port
        self._servers: dict[str, asyncio.Server] = {}
        self._unsupported_logged = False

    async def start(self) -> None:
        """Listen for every running VM, and follow VMs as they start and stop."""
        self.services.events.subscribe(self._on_event)
        for vm_id in await self.services.store.read(_running_vms):
            if self.services.vms.pending(vm_id) is None:  # one re-attaching says "started" when it is done
                await self._ensure(vm_id)

    async def stop(self) -> None:
        for vm_id in list(self._servers):
            await self._close(vm_id)

    def listening(self, vm_id: str) -> bool:
        return vm_id in self._servers

    async def _on_event(self, event: VmEvent) -> None:
        if event.kind == "started":
            await self._ensure(event.vm_id)
        elif event.kind in ("stopped", "removed"):
            await self._close(event.vm_id)

    async def _ensure(self, vm_id: str) -> None:
        old = self._servers.get(vm_id)
        if old is not None:
            await self._close(vm_id)  # a restarted VM has a new namespace: the old socket is dead
        runtime = self.services.vms.runtime
        try:
            sock = await runtime.open_listener(vm_id, self.host, self.port)
        except NotImplementedError as exc:
            if not self._unsupported_logged:
                log.info("no metadata service for %s VMs: %s", runtime.name, exc)
                self._unsupported_logged = True
            return
        except Exception:
            log.exception("metadata listener for VM %s failed", vm_id)
            return
        self._servers[vm_id] = await asyncio.start_server(
            lambda r, w: self._serve(vm_id, r, w), sock=sock, limit=MAX_REQUEST)

    async def _close(self, vm_id: str) -> None:
        server = self._servers.pop(vm_id, None)
        if server is not None:
            server.close()

    async def _serve(self, vm_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _read_request(conn, reader)
            if request is None:
                return
            status, body, ctype = await self._answer(vm_id, request)
            if request.method == b"HEAD":
                body = b""
            headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
            payload = b"".join(conn.send(e) or b"" for e in (
                h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()))
        except h11.RemoteProtocolError:
            payload = BAD_REQUEST
        except TimeoutError:
            payload = b""
        try:
            writer.write(payload)
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _answer(self, vm_id: str, request: h11.Request) -> tuple[int, bytes, str]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, b'{"error": "read-only: use GET"}\n', "application/json"
        vm = await self.services.vms.by_id(vm_id)
        if vm is None:
            return 404, b'{"error": "this VM no longer exists"}\n', "application/json"
        path = request.target.split(b"?", 1)[0]
        if path == b"/hostname":
            return 200, vm.name.encode() + b"\n", "text/plain; charset=utf-8"
        if path not in (b"/", b"/v1", b"/v1/"):
            return 404, b'{"error": "not found; try / or /hostname"}\n', "application/json"
        owner = await self.services.store.read(lambda c: user_by_id(c, vm.owner_id))
        spec = self.services.vms.spec(vm)
        data: dict[str, Any] = {
            "name": vm.name, "domain": self.services.settings.domain, "url": self.services.vms.url(vm.name),
            "ssh": self.services.vms.ssh_command(vm.name), "owner": owner.handle if owner else None,
            "image": vm.image, "cpu": vm.cpu, "memory_mb": vm.memory_mb, "disk_gb": vm.disk_gb,
            "tags": list(vm.tags), "created_at": iso(vm.created_at), "env": spec.env,
        }
        return 200, (json.dumps(data, indent=2) + "\n").encode(), "application/json"


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            conn.receive_data(data)
            if not data and conn.their_state is h11.IDLE:
                return None
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError("unexpected event", error_status_hint=400)


def _running_vms(c: sa.Connection) -> list[str]:
    return [vm.id for vm in vmq.all_vms(c) if vm.status is VmStatus.RUNNING]


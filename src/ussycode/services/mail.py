"""Inbound mail: ``<anything>@<vm>.<domain>`` into the VM's ``~/Maildir/new``, never lost once accepted.

The SMTP frontend (:mod:`ussycode.mail.smtp`) asks :meth:`MailService.check_recipient` for each ``RCPT`` and hands
the message to :meth:`MailService.accept`, which writes it to a spool file under ``<data-dir>/mail/spool/<vm id>/``
and fsyncs it before the client hears ``250``. Delivery moves spooled messages into the VM: one command run inside
the guest as its user (``runtime.exec``) unpacks them into ``~/Maildir/tmp`` and renames them into ``new/``, so the
host never opens a path in the guest's file system, and a ``Maildir`` (or ``tmp``/``new``) that is a symlink is
refused rather than followed. A stopped VM's mail waits in the spool and is delivered when it starts; the spool
survives server restarts. Delivery is at least once: a crash between the guest's rename and the spool's unlink
delivers that message again.

Limits: ``mail_max_bytes`` per message (the frontend's ``552``), ``mail_per_hour`` messages per VM and
``mail_unread_limit`` unread messages (``452``; at the unread limit receiving switches itself off, with a notice
shown by ``ls -l`` and ``share show``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import secrets
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ussycode import telemetry
from ussycode.auth.identity import Actor
from ussycode.errors import RateLimited
from ussycode.services.container import Services
from ussycode.services.events import VmEvent
from ussycode.services.ratelimit import RateLimiter
from ussycode.store import audit
from ussycode.store import mail as mailq
from ussycode.tasks import TaskGroup
from ussycode.types import VmStatus

log = logging.getLogger(__name__)

MAX_BYTES = 10 * 1024 * 1024
BATCH_BYTES = 32 * 1024 * 1024  # messages moved into a VM by one command
RETRY_SECONDS = 30.0
DELIVER_TIMEOUT = 60.0
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_VM_RE = re.compile(r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$")

# Run in the guest as its user, with the messages as a tar stream on stdin and their names as arguments.
DELIVER_SCRIPT = r"""
set -eu
cd "$HOME"
for d in Maildir Maildir/tmp Maildir/new Maildir/cur; do
  if [ -L "$d" ]; then echo "ussycode: ~/$d is a symbolic link: mail is not delivered through it" >&2; exit 3; fi
  [ -d "$d" ] || mkdir -m 700 "$d"
done
umask 077
tar -x --no-same-owner -C Maildir/tmp -f -
cd Maildir/tmp
mv -f -t ../new -- "$@"
cd ../..
ls -A Maildir/new | wc -l
"""


@dataclass(frozen=True)
class Refusal(Exception):
    """An SMTP answer other than success: ``code`` and ``text`` as the client sees them."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class Recipient:
    address: str
    vm_id: str
    vm_name: str


class MailService:
    def __init__(self, services: Services) -> None:
        self.services = services
        s = services.settings
        self.domain = s.domain
        self.spool = s.data_dir / "mail" / "spool"
        self.per_hour = RateLimiter.per_hour(s.mail_per_hour, name="mail_in")
        self.unread_limit = s.mail_unread_limit
        self.unread: dict[str, int] = {}  # VM id -> messages in new/ when last delivered to
        self.spooled: dict[str, int] = {}  # VM id -> messages waiting in the spool (counted at start)
        self._locks: dict[str, asyncio.Lock] = {}
        self.tasks = TaskGroup("mail")
        self.delivered = 0

    # --- life ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.spool.mkdir, parents=True, exist_ok=True, mode=0o700)
        for vm_id in await asyncio.to_thread(self._spooled_vms):
            self.spooled[vm_id] = await asyncio.to_thread(self._count, vm_id)
        self.services.events.subscribe(self._on_event)
        self.tasks.spawn(self._retry_forever(), "mail-retry")

    async def close(self) -> None:
        await self.tasks.close()

    async def _on_event(self, event: VmEvent) -> None:
        if event.kind == "started":
            self.kick(event.vm_id)
        elif event.kind == "removed":
            self.unread.pop(event.vm_id, None)
            self.spooled.pop(event.vm_id, None)
            await asyncio.to_thread(shutil.rmtree, self.spool / event.vm_id, True)

    async def _retry_forever(self) -> None:
        while True:
            for vm_id in await asyncio.to_thread(self._spooled_vms):
                self.kick(vm_id)
            await asyncio.sleep(RETRY_SECONDS)

    def _spooled_vms(self) -> list[str]:
        if not self.spool.is_dir():
            return []
        return [d.name for d in self.spool.iterdir() if d.is_dir() and any(self._files(d))]

    # --- the receiving switch -------------------------------------------------------------------------------
    async def set_receive(self, actor: Actor, vm_name: str, on: bool) -> bool:
        vm = await self.services.vms.get(actor, vm_name)

        def tx(c: sa.Connection) -> bool:
            changed = mailq.set_receive(c, vm.id, on)
            if changed:
                audit.record(c, actor_id=actor.id, source=actor.source,
                             action="mail.receive", target=vm.name, on=on)
            return changed

        return await self.services.store.write(tx)

    async def receive_state(self, vm_id: str) -> tuple[bool, str | None]:
        return await self.services.store.read(lambda c: mailq.state(c, vm_id))

    async def receive_states(self, vm_ids: list[str]) -> dict[str, tuple[bool, str | None]]:
        return await self.services.store.read(lambda c: mailq.states(c, vm_ids))

    # --- SMTP ----------------------------------------------------------------------------------------------
    def parse_recipient(self, address: str) -> tuple[str, str]:
        """(local part, VM name) of ``local@<vm>.<domain>``. :raise Refusal: 550 for anything else."""
        local, at, host = address.rpartition("@")
        host = host.lower().rstrip(".")
        suffix = "." + self.domain
        name = host[: -len(suffix)] if host.endswith(suffix) else ""
        if not at or not _LOCAL_RE.match(local) or not _VM_RE.match(name):
            raise Refusal(550, f"no such mailbox: we only take mail for <anything>@<vm>.{self.domain}")
        return local, name

    async def check_recipient(self, address: str) -> Recipient:
        """Whether ``address`` may receive mail now (without spending anything). :raise Refusal: 550 or 452."""
        _, name = self.parse_recipient(address)
        target = await self.services.store.read_cached(("mail-target", name), lambda c: mailq.target(c, name))
        if target is None:
            raise Refusal(550, f"no such mailbox: there is no VM named {name}")
        if not target.receive:
            raise Refusal(550, f"mailbox unavailable: {name} does not receive mail "
                               f"(its owner can run 'share receive-email {name} on')")
        try:
            self.per_hour.check(target.vm_id)
        except RateLimited:
            raise Refusal(452, f"{name} has received too many messages this hour; try again later") from None
        if self.unread.get(target.vm_id, 0) + self.spooled.get(target.vm_id, 0) >= self.unread_limit:
            await self._switch_off(target.vm_id, target.name)
            raise Refusal(452, f"{name} has {self.unread_limit} unread messages; it receives no more until "
                               "they are read and its owner turns receiving on again")
        return Recipient(address, target.vm_id, target.name)

    async def _switch_off(self, vm_id: str, name: str) -> None:
        notice = f"receiving switched off: {self.unread_limit} unread messages in ~/Maildir/new"

        def tx(c: sa.Connection) -> None:
            if mailq.set_receive(c, vm_id, False, notice):
                audit.record(c, actor_id=None, source="system", action="mail.receive",
                             target=name, on=False, reason="unread_limit")

        await self.services.store.write(tx)

    async def accept(self, recipients: list[Recipient], mail_from: str, data: bytes) -> None:
        """Spool ``data`` once per VM (with ``Return-Path``, ``Delivered-To`` and ``X-Ussycode-VM``) and fsync it;
        only then does the client hear ``250``. :raise Refusal: 452 when a VM went over its hourly limit."""
        by_vm: dict[str, Recipient] = {}
        for r in recipients:
            by_vm.setdefault(r.vm_id, r)
        for vm_id in by_vm:
            try:
                self.per_hour.take(vm_id)
            except RateLimited:
                telemetry.MAIL.labels("in", "refused").inc()
                raise Refusal(452, f"{by_vm[vm_id].vm_name} has received too many messages this hour") from None
        for vm_id, r in by_vm.items():
            head = (f"Return-Path: <{_header_safe(mail_from)}>\r\nDelivered-To: {_header_safe(r.address)}\r\n"
                    f"X-Ussycode-VM: {r.vm_name}\r\n").encode()
            await asyncio.to_thread(self._write_spool, vm_id, head + data)
            self.spooled[vm_id] = self.spooled.get(vm_id, 0) + 1
            telemetry.MAIL.labels("in", "accepted").inc()
            self.kick(vm_id)

    # --- the spool ------------------------------------------------------------------------------------------
    @staticmethod
    def _files(vm_dir: Path) -> list[Path]:
        try:
            return sorted(p for p in vm_dir.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _count(self, vm_id: str) -> int:
        return len(self._files(self.spool / vm_id))

    def _write_spool(self, vm_id: str, data: bytes) -> None:
        vm_dir = self.spool / vm_id
        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.time_ns()}.{secrets.token_hex(8)}.ussycode"
        tmp = vm_dir / ("." + name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, vm_dir / name)
        dir_fd = os.open(vm_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # --- delivery -------------------------------------------------------------------------------------------
    def kick(self, vm_id: str) -> None:
        """Deliver what is spooled for ``vm_id`` soon (one delivery per VM at a time)."""
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        if not lock.locked():
            self.tasks.spawn(self._deliver(vm_id, lock), f"mail-deliver {vm_id}")

    async def _deliver(self, vm_id: str, lock: asyncio.Lock) -> None:
        async with lock:
            while True:
                batch = await asyncio.to_thread(self._batch, vm_id)
                if not batch:
                    return
                vm = await self.services.vms.by_id(vm_id)
                if vm is None or vm.status is not VmStatus.RUNNING or self.services.vms.pending(vm_id) is not None:
                    return  # delivered when it (re)starts, or by the periodic retry
                try:
                    with telemetry.span("mail deliver", messages=len(batch)):
                        unread = await self._push(vm_id, vm.name, batch)
                except Exception as exc:  # noqa: BLE001 - the mail stays spooled; the retry tries again
                    log.warning("mail for %s stays queued: %s", vm.name, exc)
                    telemetry.MAIL.labels("in", "deferred").inc(len(batch))
                    return
                self.unread[vm_id] = unread
                self.delivered += len(batch)
                telemetry.MAIL.labels("in", "delivered").inc(len(batch))
                for path, _ in batch:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                self.spooled[vm_id] = max(0, self.spooled.get(vm_id, 0) - len(batch))

    def _batch(self, vm_id: str) -> list[tuple[Path, bytes]]:
        batch: list[tuple[Path, bytes]] = []
        size = 0
        for path in self._files(self.spool / vm_id):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if batch and size + len(data) > BATCH_BYTES:
                break
            batch.append((path, data))
            size += len(data)
        return batch

    async def _push(self, vm_id: str, name: str, batch: list[tuple[Path, bytes]]) -> int:
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for path, data in batch:
                info = tarfile.TarInfo(path.name)
                info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        argv = ["sh", "-c", DELIVER_SCRIPT, "ussycode-deliver", *(p.name for p, _ in batch)]
        result = await self.services.vms.runtime.exec(vm_id, argv, stdin=stream.getvalue(), timeout=DELIVER_TIMEOUT)
        if result.exit_status != 0:
            raise RuntimeError(f"delivery into {name} failed (exit {result.exit_status}): "
                               f"{result.stderr.decode(errors='replace').strip()[-300:]}")
        try:
            return int(result.stdout.split()[-1])
        except (ValueError, IndexError):
            return 0


def _header_safe(value: str) -> str:
    """An envelope address as a header value: no line breaks or control characters (they came from a client)."""
    return "".join(ch for ch in value if ch.isprintable())[:320]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


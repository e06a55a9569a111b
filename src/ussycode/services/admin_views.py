"""What operators and admins may see of other accounts and their VMs: the dashboard's numbers, the lists, one
account in detail, the audit log and a VM's console (:class:`AdminViews`, the read side of
:class:`ussycode.services.admin.AdminService`). Every read checks the acting user's role first
(:mod:`ussycode.auth.policy`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.auth.policy import Action, can
from ussycode.errors import Forbidden, NotFound, UsageError
from ussycode.services.quotas import effective_limits
from ussycode.services.vms import VmService
from ussycode.store import admin as aq
from ussycode.store import llm as llmq
from ussycode.store import tokens as tokq
from ussycode.store import users as userq
from ussycode.store import vms as vmq
from ussycode.store.db import Store
from ussycode.store.schema import utcnow
from ussycode.store.users import User
from ussycode.types import Limits, TrustLevel, VmStatus
from ussycode.validate import printable_text

MAIL_ACTIONS = ("mail.send", "mail.refused", "mail.receive")
STATS_MAX_AGE = 30.0  # /metrics re-reads the counts after any write here, or after this many seconds


@dataclass(frozen=True)
class UserDetail:
    user: User
    limits: Limits
    keys: list[userq.SshKey]
    vms: list[vmq.Vm]
    tokens: list[tokq.ApiToken]
    shares: dict[str, list[dict[str, Any]]]
    audit: list[dict[str, Any]]


def _staff_only(actor: Actor, action: Action = Action.ADMIN_VIEW) -> None:
    if not can(actor, action):
        raise Forbidden("only operators and admins can do that" if action is not Action.VM_REMOVE_ANY
                        else "only an admin can remove other users' VMs")


def _user_id(c: sa.Connection, handle: str) -> str | None:
    user = userq.by_handle(c, handle.strip().lower()[:64])
    return user.id if user is not None else None


def host_usage(path: str) -> dict[str, float]:
    """Load, memory and disk of the host (for the dashboard); best effort."""
    out: dict[str, float] = {"cpus": float(os.cpu_count() or 1)}
    try:
        out["load1"], out["load5"], out["load15"] = os.getloadavg()
    except OSError:
        pass
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
        info = dict(line.split(":", 1) for line in lines)
        out["mem_total_mb"] = int(info["MemTotal"].split()[0]) / 1024
        out["mem_available_mb"] = int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        du = shutil.disk_usage(path)
        out["disk_total_gb"], out["disk_free_gb"] = du.total / 2**30, du.free / 2**30
    except OSError:
        pass
    return out


class AdminViews:
    """The reads (a mixin of :class:`AdminService`, which sets these attributes)."""

    store: Store
    vms: VmService
    data_dir: str
    _stats: tuple[int, float, dict[str, Any]] | None

    async def stats(self, actor: Actor) -> dict[str, Any]:
        _staff_only(actor)
        since = utcnow().replace(hour=0, minute=0, second=0)

        def read(c: sa.Connection) -> dict[str, Any]:
            data = aq.stats(c)
            data["mail_today"] = aq.actions_since(c, MAIL_ACTIONS, since)
            data["llm_tokens_today"] = llmq.tokens_on(c, since.date())
            data["errors"] = aq.vms_page(c, status=VmStatus.ERROR.value, limit=10).rows
            data["recent"] = aq.audit_page(c, limit=10).rows
            return data

        data = await self.store.read(read)
        data["host"] = host_usage(self.data_dir)
        return data

    async def instance_stats(self) -> dict[str, Any]:
        """Counts for ``/metrics`` (no actor: the metrics address is the operator's, on loopback by default).

        Read again only when this server wrote to the database since (the store's generation) or after
        :data:`STATS_MAX_AGE` seconds (a change made by another process, such as ``ussycode admin promote``)."""
        generation, now = self.store.generation, time.monotonic()
        cached = self._stats
        if cached is not None and cached[0] == generation and now - cached[1] < STATS_MAX_AGE:
            return cached[2]
        stats = await self.store.read(aq.stats)
        self._stats = (generation, now, stats)
        return stats

    async def list_users(self, actor: Actor, *, search: str = "", tier: str = "", suspended: bool | None = None,
                         offset: int = 0, limit: int = 50) -> aq.Page:
        _staff_only(actor)
        if tier and tier not in TrustLevel.__members__.values():
            raise UsageError(f"unknown tier {tier!r}: use newbie, citizen, operator or admin")
        search = printable_text(search, "search", max_len=100)
        return await self.store.read(lambda c: aq.users_page(c, search=search, tier=tier, suspended=suspended,
                                                             offset=offset, limit=limit))

    async def user(self, actor: Actor, handle: str) -> UserDetail:
        _staff_only(actor)

        def read(c: sa.Connection) -> UserDetail:
            user = userq.by_handle(c, handle.strip().lower()[:64])
            if user is None:
                raise NotFound(f"no user {handle[:40]!r}")
            return UserDetail(user, effective_limits(user), userq.keys_of(c, user.id), vmq.of_owner(c, user.id),
                              tokq.of_user(c, user.id), aq.shares_of(c, owner_id=user.id),
                              aq.audit_page(c, actor_id=user.id, limit=20).rows)

        return await self.store.read(read)

    async def list_vms(self, actor: Actor, *, owner: str = "", status: str = "", search: str = "", offset: int = 0,
                       limit: int = 50) -> aq.Page:
        _staff_only(actor)
        if status and status not in VmStatus.__members__.values():
            raise UsageError(f"unknown status {status!r}")
        search = printable_text(search, "search", max_len=100)

        def read(c: sa.Connection) -> aq.Page:
            owner_id = _user_id(c, owner) if owner else ""
            if owner_id is None:
                raise NotFound(f"no user {owner[:40]!r}")
            return aq.vms_page(c, owner_id=owner_id, status=status, search=search, offset=offset, limit=limit)

        return await self.store.read(read)

    async def list_tokens(self, actor: Actor, *, active_only: bool = True, offset: int = 0,
                          limit: int = 50) -> aq.Page:
        _staff_only(actor)
        return await self.store.read(lambda c: aq.tokens_page(c, active_at=utcnow() if active_only else None,
                                                              offset=offset, limit=limit))

    async def llm_usage(self, actor: Actor, days: int = 7) -> list[dict[str, Any]]:
        """Every user's LLM usage per provider and day, the last ``days`` days, largest first."""
        _staff_only(actor)
        since = utcnow().date() - dt.timedelta(days=max(0, min(days, 366)) - 1)
        return await self.store.read(lambda c: llmq.usage_page(c, since, limit=500))

    async def list_shares(self, actor: Actor) -> dict[str, list[dict[str, Any]]]:
        _staff_only(actor)
        return await self.store.read(lambda c: aq.shares_of(c))

    async def audit(self, actor: Actor, *, actor_handle: str = "", action: str = "", target: str = "",
                    since: dt.datetime | None = None, until: dt.datetime | None = None, before: int | None = None,
                    limit: int = 50) -> aq.Page:
        _staff_only(actor)
        action = printable_text(action, "action", max_len=64)
        target = printable_text(target, "target", max_len=200)

        def read(c: sa.Connection) -> aq.Page:
            actor_id = _user_id(c, actor_handle) if actor_handle else ""
            if actor_id is None:
                return aq.Page([], None)
            return aq.audit_page(c, actor_id=actor_id, action=action, target=target, since=since, until=until,
                                 before=before, limit=limit)

        return await self.store.read(read)

    async def _vm_and_owner(self, name: str) -> tuple[vmq.Vm, User]:
        def read(c: sa.Connection) -> tuple[vmq.Vm, User]:
            vm = vmq.by_name(c, name.strip().lower()[:40])
            if vm is None:
                raise NotFound(f"no VM {name[:40]!r}")
            owner = userq.by_id(c, vm.owner_id)
            assert owner is not None
            return vm, owner

        return await self.store.read(read)

    async def console_tail(self, actor: Actor, name: str, max_bytes: int = 16_384) -> str:
        """The end of a VM's console log (boot and init output), printable characters only."""
        _staff_only(actor)
        vm, _ = await self._vm_and_owner(name)
        path = self.vms.runtime.console_log(vm.id)
        if path is None:
            return "(this runtime keeps no console log)"

        def tail() -> str:
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - max_bytes))
                    data = f.read(max_bytes)
            except FileNotFoundError:
                return "(no console output yet)"
            text = data.decode("utf-8", errors="replace")
            return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)

        return await asyncio.to_thread(tail)


__all__ = ["AdminViews", "UserDetail", "host_usage"]

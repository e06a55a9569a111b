"""The operator's reads: paginated listings over every user, VM, token and audit row, and instance counts.

Every listing is bounded (``limit``) and ordered by an indexed column, so a page costs the same with 10,000 users,
50,000 VMs and a million audit rows. The audit log pages by id (``before``: keyset pagination), never by offset.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ussycode.store.schema import (
    api_tokens,
    audit_log,
    custom_domains,
    share_links,
    ssh_keys,
    users,
    vm_public_ports,
    vm_shares,
    vms,
)

MAX_PAGE = 500


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    total: int | None  # None where counting would cost more than the page (the audit log)
    next_before: int | None = None  # audit: the id to pass as ``before`` for the next (older) page


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _bounded(limit: int) -> int:
    return max(1, min(int(limit), MAX_PAGE))


_VM_COUNT = (sa.select(sa.func.count()).select_from(vms).where(vms.c.owner_id == users.c.id)
             .correlate(users).scalar_subquery())


def users_page(c: sa.Connection, *, search: str = "", tier: str = "", suspended: bool | None = None,
               offset: int = 0, limit: int = 50) -> Page:
    conds: list[sa.ColumnElement[bool]] = []
    if search:
        conds.append(sa.or_(users.c.handle.like(_like(search.lower()), escape="\\"),
                            users.c.email.like(_like(search.lower()), escape="\\")))
    if tier:
        conds.append(users.c.trust_level == tier)
    if suspended is not None:
        conds.append(users.c.suspended_at.is_not(None) if suspended else users.c.suspended_at.is_(None))
    total = int(c.execute(sa.select(sa.func.count()).select_from(users).where(*conds)).scalar_one())
    q = (sa.select(users.c.id, users.c.handle, users.c.email, users.c.trust_level, users.c.created_at,
                   users.c.suspended_at, users.c.suspend_reason, users.c.quota, _VM_COUNT.label("vm_count"))
         .where(*conds).order_by(users.c.handle).offset(max(0, offset)).limit(_bounded(limit)))
    return Page([dict(r._mapping) for r in c.execute(q)], total)


def vms_page(c: sa.Connection, *, owner_id: str = "", status: str = "", search: str = "", offset: int = 0,
             limit: int = 50) -> Page:
    conds: list[sa.ColumnElement[bool]] = []
    if owner_id:
        conds.append(vms.c.owner_id == owner_id)
    if status:
        conds.append(vms.c.status == status)
    if search:
        conds.append(vms.c.name.like(_like(search.lower()), escape="\\"))
    total = int(c.execute(sa.select(sa.func.count()).select_from(vms).where(*conds)).scalar_one())
    q = (sa.select(vms.c.id, vms.c.name, vms.c.status, vms.c.desired, vms.c.image, vms.c.cpu, vms.c.memory_mb,
                   vms.c.disk_gb, vms.c.runtime, vms.c.error, vms.c.created_at, users.c.handle.label("owner"))
         .select_from(vms.join(users, users.c.id == vms.c.owner_id))
         .where(*conds).order_by(vms.c.name).offset(max(0, offset)).limit(_bounded(limit)))
    return Page([dict(r._mapping) for r in c.execute(q)], total)


def tokens_page(c: sa.Connection, *, user_id: str = "", active_at: dt.datetime | None = None, offset: int = 0,
                limit: int = 50) -> Page:
    conds: list[sa.ColumnElement[bool]] = []
    if user_id:
        conds.append(api_tokens.c.user_id == user_id)
    if active_at is not None:
        conds += [api_tokens.c.revoked_at.is_(None),
                  sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at > active_at)]
    total = int(c.execute(sa.select(sa.func.count()).select_from(api_tokens).where(*conds)).scalar_one())
    q = (sa.select(api_tokens.c.id, api_tokens.c.cmds, api_tokens.c.created_at, api_tokens.c.expires_at,
                   api_tokens.c.last_used_at, api_tokens.c.revoked_at, users.c.handle.label("owner"),
                   vms.c.name.label("vm"))
         .select_from(api_tokens.join(users, users.c.id == api_tokens.c.user_id)
                      .outerjoin(vms, vms.c.id == api_tokens.c.vm_id))
         .where(*conds).order_by(api_tokens.c.created_at.desc(), api_tokens.c.id)
         .offset(max(0, offset)).limit(_bounded(limit)))
    return Page([dict(r._mapping) for r in c.execute(q)], total)


def shares_of(c: sa.Connection, *, owner_id: str = "", limit: int = 200) -> dict[str, list[dict[str, Any]]]:
    """Public ports, shares with people, share links and custom domains (newest first, ``limit`` each).

    Without an owner, each small table is cut to ``limit`` rows first and only those rows are joined to VMs and
    users (SQLite would otherwise walk every VM to sort); with one, the owner's VMs are the starting point."""
    n = _bounded(limit)
    out: dict[str, list[dict[str, Any]]] = {}
    for key, table, order, names in (
        ("public", vm_public_ports, [vm_public_ports.c.vm_id, vm_public_ports.c.port], ["port"]),
        ("links", share_links, [share_links.c.created_at.desc()], ["id", "port", "created_at", "expires_at", "uses"]),
        ("domains", custom_domains, [custom_domains.c.created_at.desc()], ["domain", "created_at", "verified_at"]),
    ):
        out[key] = _small_first(c, table, order, names, owner_id, n)
    out["people"] = _people(c, owner_id, n)
    return out


def _small_first(c: sa.Connection, table: sa.Table, order: list[Any], names: list[str], owner_id: str,
                 n: int) -> list[dict[str, Any]]:
    owner = users.alias("owner")
    if owner_id:
        src: Any = table.join(vms, vms.c.id == table.c.vm_id)
        cols: list[Any] = [table.c[name] for name in names]
        where = [vms.c.owner_id == owner_id]
    else:
        cut = sa.select(table).order_by(*order).limit(n).subquery()
        src = cut.join(vms, vms.c.id == cut.c.vm_id)
        cols = [cut.c[name] for name in names]
        where = []
    q = (sa.select(vms.c.name.label("vm"), owner.c.handle.label("owner"), *cols)
         .select_from(src.join(owner, owner.c.id == vms.c.owner_id)).where(*where).limit(n))
    return [dict(r._mapping) for r in c.execute(q)]


def _people(c: sa.Connection, owner_id: str, n: int) -> list[dict[str, Any]]:
    owner, sharee = users.alias("owner"), users.alias("sharee")
    if owner_id:
        src: Any = vm_shares.join(vms, vms.c.id == vm_shares.c.vm_id)
        t: Any = vm_shares
        where = [vms.c.owner_id == owner_id]
    else:
        t = sa.select(vm_shares).order_by(vm_shares.c.created_at.desc()).limit(n).subquery()
        src = t.join(vms, vms.c.id == t.c.vm_id)
        where = []
    q = (sa.select(vms.c.name.label("vm"), owner.c.handle.label("owner"),
                   sa.func.coalesce(sharee.c.handle, t.c.email).label("with"), t.c.created_at)
         .select_from(src.join(owner, owner.c.id == vms.c.owner_id).outerjoin(sharee, sharee.c.id == t.c.user_id))
         .where(*where).order_by(t.c.created_at.desc()).limit(n))
    return [dict(r._mapping) for r in c.execute(q)]


def keys_count(c: sa.Connection, user_id: str) -> int:
    return int(c.execute(sa.select(sa.func.count()).select_from(ssh_keys)
                         .where(ssh_keys.c.user_id == user_id)).scalar_one())


def audit_page(c: sa.Connection, *, actor_id: str = "", action: str = "", target: str = "",
               since: dt.datetime | None = None, until: dt.datetime | None = None, before: int | None = None,
               limit: int = 50) -> Page:
    """Newest first; ``action`` matches a whole action or a prefix ending in ``.`` (``vm.`` = every VM action)."""
    conds: list[sa.ColumnElement[bool]] = []
    if actor_id:
        conds.append(audit_log.c.actor_id == actor_id)
    if action:
        conds.append(audit_log.c.action.like(_like(action)[1:], escape="\\") if action.endswith(".")
                     else audit_log.c.action == action)
    if target:
        conds.append(audit_log.c.target == target)
    if since is not None:
        conds.append(audit_log.c.at >= since)
    if until is not None:
        conds.append(audit_log.c.at < until)
    if before is not None:
        conds.append(audit_log.c.id < before)
    n = _bounded(limit)
    q = (sa.select(audit_log, users.c.handle.label("actor"))
         .select_from(audit_log.outerjoin(users, users.c.id == audit_log.c.actor_id))
         .where(*conds).order_by(audit_log.c.id.desc()).limit(n + 1))
    rows = [dict(r._mapping) for r in c.execute(q)]
    more = len(rows) > n
    rows = rows[:n]
    return Page(rows, None, rows[-1]["id"] if more and rows else None)


def stats(c: sa.Connection) -> dict[str, Any]:
    """Counts for the dashboard and ``/metrics``: users by tier, suspended users, VMs by status and runtime."""
    tiers: dict[str, int] = {str(t): int(n) for t, n in c.execute(
        sa.select(users.c.trust_level, sa.func.count()).group_by(users.c.trust_level))}
    suspended = c.execute(sa.select(sa.func.count()).select_from(users)
                          .where(users.c.suspended_at.is_not(None))).scalar_one()
    by_state = [(str(s), str(r), int(n)) for s, r, n in
                c.execute(sa.select(vms.c.status, vms.c.runtime, sa.func.count())
                          .group_by(vms.c.status, vms.c.runtime)).all()]
    return {"users": int(sum(tiers.values())), "users_by_tier": {str(k): int(v) for k, v in tiers.items()},
            "suspended": int(suspended), "vms_by_state": by_state,
            "vms": sum(n for _, _, n in by_state)}


def actions_since(c: sa.Connection, actions: tuple[str, ...], since: dt.datetime) -> dict[str, int]:
    """How many audit rows of each of ``actions`` since ``since`` (mail sent/refused today).

    The first row at or after ``since`` is found on the time index, then each action is counted from that id on
    the (action, id) index: a cost in today's rows, not in the log's million."""
    first = sa.select(audit_log.c.id).where(audit_log.c.at >= since).order_by(audit_log.c.at).limit(1)
    start = c.execute(first).scalar()
    if start is None:
        return {}
    q = (sa.select(audit_log.c.action, sa.func.count())
         .where(audit_log.c.action.in_(actions), audit_log.c.id >= start).group_by(audit_log.c.action))
    return {str(a): int(n) for a, n in c.execute(q)}

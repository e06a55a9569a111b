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
    """Public ports, shares with people, share links and custom domains (newest first, ``limit`` each)."""
    owner = users.alias("owner")
    base = vms.join(owner, owner.c.id == vms.c.owner_id)
    where = [vms.c.owner_id == owner_id] if owner_id else []
    n = _bounded(limit)
    public = c.execute(sa.select(vms.c.name.label("vm"), owner.c.handle.label("owner"), vm_public_ports.c.port)
                       .select_from(vm_public_ports.join(base, vms.c.id == vm_public_ports.c.vm_id)).where(*where)
                       .order_by(vms.c.name, vm_public_ports.c.port).limit(n))
    sharee = users.alias("sharee")
    people = c.execute(sa.select(vms.c.name.label("vm"), owner.c.handle.label("owner"),
                                 sa.func.coalesce(sharee.c.handle, vm_shares.c.email).label("with"),
                                 vm_shares.c.created_at)
                       .select_from(vm_shares.join(base, vms.c.id == vm_shares.c.vm_id)
                                    .outerjoin(sharee, sharee.c.id == vm_shares.c.user_id))
                       .where(*where).order_by(vm_shares.c.created_at.desc()).limit(n))
    links = c.execute(sa.select(vms.c.name.label("vm"), owner.c.handle.label("owner"), share_links.c.id,
                                share_links.c.port, share_links.c.created_at, share_links.c.expires_at,
                                share_links.c.uses)
                      .select_from(share_links.join(base, vms.c.id == share_links.c.vm_id)).where(*where)
                      .order_by(share_links.c.created_at.desc()).limit(n))
    domains = c.execute(sa.select(vms.c.name.label("vm"), owner.c.handle.label("owner"), custom_domains.c.domain,
                                  custom_domains.c.created_at, custom_domains.c.verified_at)
                        .select_from(custom_domains.join(base, vms.c.id == custom_domains.c.vm_id)).where(*where)
                        .order_by(custom_domains.c.created_at.desc()).limit(n))
    return {"public": [dict(r._mapping) for r in public], "people": [dict(r._mapping) for r in people],
            "links": [dict(r._mapping) for r in links], "domains": [dict(r._mapping) for r in domains]}


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


def actions_since(c: sa.Connection, prefix: str, since: dt.datetime) -> dict[str, int]:
    """How many audit rows of each action starting with ``prefix`` since ``since`` (mail sent/refused today)."""
    q = (sa.select(audit_log.c.action, sa.func.count()).where(
        audit_log.c.at >= since, audit_log.c.action.like(_like(prefix)[1:], escape="\\"))
        .group_by(audit_log.c.action))
    return {str(a): int(n) for a, n in c.execute(q)}

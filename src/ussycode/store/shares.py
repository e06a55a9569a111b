"""Queries for who may open a VM's URLs: public ports, per-user shares, share links, custom domains.

Every function takes an open connection (the caller owns the transaction). Share links are looked up by the
hash of their token; a link opens one port of one VM. Custom domains may have several pending claims (one per
VM) until one is verified; at most one verified row per domain (a unique partial index).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from ussycode.store.schema import custom_domains, share_links, users, utcnow, vm_public_ports, vm_shares, vms
from ussycode.types import VmStatus


@dataclass(frozen=True)
class LinkRow:
    id: str
    token_hash: str
    port: int
    expires_at: dt.datetime | None  # naive UTC
    uses: int


@dataclass(frozen=True)
class AccessRecord:
    """What forward-auth needs about one VM, read in one transaction."""

    vm_id: str
    name: str
    owner_id: str
    status: VmStatus
    public_ports: frozenset[int]
    cnames: frozenset[str]
    user_ids: frozenset[str]
    emails: frozenset[str]
    links: tuple[LinkRow, ...]
    owner_suspended: bool = False


@dataclass(frozen=True)
class ClaimRow:
    domain: str
    vm_id: str
    verify_token: str
    created_at: dt.datetime
    verified_at: dt.datetime | None


# --- public ports and user shares -----------------------------------------------------------------------------


def public_ports(c: sa.Connection, vm_id: str) -> list[int]:
    return sorted(r[0] for r in c.execute(sa.select(vm_public_ports.c.port).where(vm_public_ports.c.vm_id == vm_id)))


def set_port_public(c: sa.Connection, vm_id: str, port: int, public: bool) -> bool:
    """Make ``port`` public or private; False when it already was."""
    where = (vm_public_ports.c.vm_id == vm_id) & (vm_public_ports.c.port == port)
    exists = c.execute(sa.select(vm_public_ports).where(where)).first() is not None
    if exists == public:
        return False
    if public:
        c.execute(vm_public_ports.insert().values(vm_id=vm_id, port=port))
    else:
        c.execute(vm_public_ports.delete().where(where))
    return True


def sharees(c: sa.Connection, vm_id: str) -> list[str]:
    """Handles and e-mail addresses the VM is shared with, in the order they were added."""
    rows = c.execute(
        sa.select(users.c.handle, vm_shares.c.email)
        .select_from(vm_shares.outerjoin(users, users.c.id == vm_shares.c.user_id))
        .where(vm_shares.c.vm_id == vm_id).order_by(vm_shares.c.id)
    ).all()
    return [r[0] or r[1] for r in rows]


def share_exists(c: sa.Connection, vm_id: str, *, user_id: str | None, email: str | None) -> bool:
    col, value = (vm_shares.c.user_id, user_id) if user_id else (vm_shares.c.email, email)
    return c.execute(sa.select(vm_shares.c.id).where(vm_shares.c.vm_id == vm_id, col == value)).first() is not None


def count_shares(c: sa.Connection, vm_id: str) -> int:
    return int(c.execute(sa.select(sa.func.count()).select_from(vm_shares)
                         .where(vm_shares.c.vm_id == vm_id)).scalar_one())


def add_share(c: sa.Connection, vm_id: str, *, user_id: str | None, email: str | None, created_by: str) -> None:
    c.execute(vm_shares.insert().values(vm_id=vm_id, user_id=user_id, email=email, created_by=created_by,
                                        created_at=utcnow()))


def remove_share(c: sa.Connection, vm_id: str, *, user_id: str | None, email: str | None) -> int:
    cond = vm_shares.c.user_id == user_id if user_id else vm_shares.c.email == email
    return int(c.execute(vm_shares.delete().where(vm_shares.c.vm_id == vm_id, cond)).rowcount)


# --- share links ------------------------------------------------------------------------------------------------


def links_of(c: sa.Connection, vm_id: str) -> list[LinkRow]:
    rows = c.execute(sa.select(share_links).where(share_links.c.vm_id == vm_id)
                     .order_by(share_links.c.created_at, share_links.c.id))
    return [LinkRow(r.id, r.token_hash, r.port, r.expires_at, r.uses) for r in rows]


def count_links(c: sa.Connection, vm_id: str) -> int:
    return int(c.execute(sa.select(sa.func.count()).select_from(share_links)
                         .where(share_links.c.vm_id == vm_id)).scalar_one())


def add_link(c: sa.Connection, *, link_id: str, token_hash: str, vm_id: str, port: int, created_by: str,
             created_at: dt.datetime, expires_at: dt.datetime | None) -> None:
    c.execute(share_links.insert().values(id=link_id, token_hash=token_hash, vm_id=vm_id, port=port,
                                          created_by=created_by, created_at=created_at, expires_at=expires_at,
                                          uses=0))


def remove_link(c: sa.Connection, vm_id: str, *, link_id: str | None = None, token_hash: str | None = None) -> int:
    cond = share_links.c.id == link_id if link_id is not None else share_links.c.token_hash == token_hash
    return int(c.execute(share_links.delete().where(share_links.c.vm_id == vm_id, cond)).rowcount)


def count_link_use(c: sa.Connection, token_hash: str) -> None:
    c.execute(share_links.update().where(share_links.c.token_hash == token_hash)
              .values(uses=share_links.c.uses + 1))


# --- custom domains -------------------------------------------------------------------------------------------------


def _claim(r: sa.Row[tuple[str, str, str, dt.datetime, dt.datetime | None]]) -> ClaimRow:
    return ClaimRow(r.domain, r.vm_id, r.verify_token, r.created_at, r.verified_at)


def claims_of_vm(c: sa.Connection, vm_id: str) -> list[ClaimRow]:
    rows = c.execute(sa.select(custom_domains).where(custom_domains.c.vm_id == vm_id)
                     .order_by(custom_domains.c.domain))
    return [_claim(r) for r in rows]


def claim(c: sa.Connection, domain: str, vm_id: str) -> ClaimRow | None:
    r = c.execute(sa.select(custom_domains).where(custom_domains.c.domain == domain,
                                                   custom_domains.c.vm_id == vm_id)).first()
    return None if r is None else _claim(r)


def verified_claim(c: sa.Connection, domain: str) -> ClaimRow | None:
    r = c.execute(sa.select(custom_domains).where(custom_domains.c.domain == domain,
                                                   custom_domains.c.verified_at.is_not(None))).first()
    return None if r is None else _claim(r)


def purge_expired_claims(c: sa.Connection, older_than: dt.datetime) -> int:
    """Drop pending claims made before ``older_than`` (verified ones stay)."""
    return int(c.execute(custom_domains.delete().where(custom_domains.c.verified_at.is_(None),
                                                       custom_domains.c.created_at < older_than)).rowcount)


def add_claim(c: sa.Connection, domain: str, vm_id: str, verify_token: str) -> None:
    c.execute(custom_domains.insert().values(domain=domain, vm_id=vm_id, verify_token=verify_token,
                                             created_at=utcnow(), verified_at=None))


def mark_verified(c: sa.Connection, domain: str, vm_id: str) -> int:
    """Verify this VM's claim and drop every other pending claim on the domain. Returns the other claims dropped."""
    c.execute(custom_domains.update().where(custom_domains.c.domain == domain, custom_domains.c.vm_id == vm_id)
              .values(verified_at=utcnow()))
    return int(c.execute(custom_domains.delete().where(custom_domains.c.domain == domain,
                                                       custom_domains.c.vm_id != vm_id)).rowcount)


def remove_claim(c: sa.Connection, domain: str, vm_id: str) -> int:
    return int(c.execute(custom_domains.delete().where(custom_domains.c.domain == domain,
                                                       custom_domains.c.vm_id == vm_id)).rowcount)


def verified_cnames(c: sa.Connection) -> frozenset[str]:
    return frozenset(r[0] for r in c.execute(
        sa.select(custom_domains.c.domain).where(custom_domains.c.verified_at.is_not(None))))


def verified_cnames_by_vm(c: sa.Connection) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for domain, vm_id in c.execute(sa.select(custom_domains.c.domain, custom_domains.c.vm_id)
                                   .where(custom_domains.c.verified_at.is_not(None))
                                   .order_by(custom_domains.c.domain)):
        out.setdefault(vm_id, []).append(domain)
    return out


def public_ports_by_vm(c: sa.Connection) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for vm_id, port in c.execute(sa.select(vm_public_ports.c.vm_id, vm_public_ports.c.port)):
        out.setdefault(vm_id, set()).add(port)
    return out


def vm_names(c: sa.Connection) -> frozenset[str]:
    return frozenset(r[0] for r in c.execute(sa.select(vms.c.name)))


# --- forward-auth's read (hot path: statements built once) -----------------------------------------------------------

_VM_COLS = (vms.c.id, vms.c.name, vms.c.owner_id, vms.c.status, users.c.suspended_at)
_VM_AND_OWNER = vms.join(users, users.c.id == vms.c.owner_id)
_Q_VM_BY_NAME = sa.select(*_VM_COLS).select_from(_VM_AND_OWNER).where(vms.c.name == sa.bindparam("name"))
_Q_VM_BY_CNAME = (sa.select(*_VM_COLS).select_from(_VM_AND_OWNER.join(custom_domains,
                                                                      custom_domains.c.vm_id == vms.c.id))
                  .where(custom_domains.c.domain == sa.bindparam("domain"), custom_domains.c.verified_at.is_not(None)))
_Q_PORTS = sa.select(vm_public_ports.c.port).where(vm_public_ports.c.vm_id == sa.bindparam("vm_id"))
_Q_CNAMES = sa.select(custom_domains.c.domain).where(custom_domains.c.vm_id == sa.bindparam("vm_id"),
                                                     custom_domains.c.verified_at.is_not(None))
_Q_SHARES = sa.select(vm_shares.c.user_id, vm_shares.c.email).where(vm_shares.c.vm_id == sa.bindparam("vm_id"))
_Q_LINKS = (sa.select(share_links.c.id, share_links.c.token_hash, share_links.c.port, share_links.c.expires_at,
                      share_links.c.uses)
            .where(share_links.c.vm_id == sa.bindparam("vm_id")))
_Q_LINKS_IN = _Q_LINKS.where(share_links.c.token_hash.in_(sa.bindparam("hashes", expanding=True)))
MAX_PRESENTED_LINKS = 8


def access_record(c: sa.Connection, *, vm_name: str | None = None, cname: str | None = None,
                  link_hashes: tuple[str, ...] | None = None) -> AccessRecord | None:
    """The VM behind a host (by name or verified custom domain) with its access rules, read in ``c``.

    ``link_hashes`` limits the share links read to those the request presents (None reads all of them).
    """
    if vm_name is not None:
        row = c.execute(_Q_VM_BY_NAME, {"name": vm_name}).first()
    elif cname is not None:
        row = c.execute(_Q_VM_BY_CNAME, {"domain": cname}).first()
    else:
        return None
    if row is None:
        return None
    p = {"vm_id": row.id}
    ports = frozenset(r[0] for r in c.execute(_Q_PORTS, p))
    cnames = frozenset(r[0] for r in c.execute(_Q_CNAMES, p)) if cname is not None else frozenset()
    shares = c.execute(_Q_SHARES, p).all()
    if link_hashes is None:
        rows = c.execute(_Q_LINKS, p).all()
    elif link_hashes:
        rows = c.execute(_Q_LINKS_IN, {**p, "hashes": list(link_hashes[:MAX_PRESENTED_LINKS])}).all()
    else:
        rows = []
    links = tuple(LinkRow(r.id, r.token_hash, r.port, r.expires_at, r.uses) for r in rows)
    return AccessRecord(
        row.id, row.name, row.owner_id, VmStatus(row.status), ports, cnames,
        frozenset(s.user_id for s in shares if s.user_id),
        frozenset(s.email.lower() for s in shares if s.email), links, row.suspended_at is not None,
    )

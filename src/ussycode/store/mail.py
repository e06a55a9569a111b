"""Queries for mail: a VM's receiving switch, pending e-mail verifications, who a VM may write to.

``users.email`` holds verified addresses only; an address being verified lives in ``email_codes`` until its code
is entered. Every function takes an open connection (the caller owns the transaction).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from ussycode.store.schema import email_codes, users, utcnow, vm_mail, vm_shares, vms


@dataclass(frozen=True)
class MailTarget:
    """The VM an inbound address names, with its receiving state."""

    vm_id: str
    name: str
    owner_id: str
    receive: bool
    notice: str | None


@dataclass(frozen=True)
class PendingCode:
    address: str
    code_hash: str
    expires_at: dt.datetime
    attempts: int


def target(c: sa.Connection, name: str) -> MailTarget | None:
    row = c.execute(
        sa.select(vms.c.id, vms.c.name, vms.c.owner_id, vm_mail.c.receive, vm_mail.c.notice)
        .select_from(vms.outerjoin(vm_mail, vm_mail.c.vm_id == vms.c.id))
        .where(vms.c.name == name)
    ).first()
    if row is None:
        return None
    return MailTarget(row.id, row.name, row.owner_id, bool(row.receive), row.notice)


def state(c: sa.Connection, vm_id: str) -> tuple[bool, str | None]:
    row = c.execute(sa.select(vm_mail.c.receive, vm_mail.c.notice).where(vm_mail.c.vm_id == vm_id)).first()
    return (False, None) if row is None else (bool(row.receive), row.notice)


def states(c: sa.Connection, vm_ids: list[str]) -> dict[str, tuple[bool, str | None]]:
    rows = c.execute(sa.select(vm_mail.c.vm_id, vm_mail.c.receive, vm_mail.c.notice)
                     .where(vm_mail.c.vm_id.in_(vm_ids))).all()
    return {r.vm_id: (bool(r.receive), r.notice) for r in rows}


def set_receive(c: sa.Connection, vm_id: str, on: bool, notice: str | None = None) -> bool:
    """Turn receiving on or off (``notice`` says why it went off by itself). True if it changed."""
    before = c.execute(sa.select(vm_mail.c.receive).where(vm_mail.c.vm_id == vm_id)).scalar_one_or_none()
    if before is None:
        c.execute(vm_mail.insert().values(vm_id=vm_id, receive=on, notice=notice, updated_at=utcnow()))
        return on
    c.execute(vm_mail.update().where(vm_mail.c.vm_id == vm_id)
              .values(receive=on, notice=notice, updated_at=utcnow()))
    return bool(before) != on


def set_pending(c: sa.Connection, user_id: str, address: str, code_hash: str, expires_at: dt.datetime) -> None:
    c.execute(email_codes.delete().where(email_codes.c.user_id == user_id))
    c.execute(email_codes.insert().values(user_id=user_id, address=address, code_hash=code_hash,
                                          created_at=utcnow(), expires_at=expires_at, attempts=0))


def pending(c: sa.Connection, user_id: str) -> PendingCode | None:
    row = c.execute(sa.select(email_codes).where(email_codes.c.user_id == user_id)).first()
    if row is None:
        return None
    return PendingCode(row.address, row.code_hash, row.expires_at, row.attempts)


def count_attempt(c: sa.Connection, user_id: str) -> None:
    c.execute(email_codes.update().where(email_codes.c.user_id == user_id)
              .values(attempts=email_codes.c.attempts + 1))


def drop_pending(c: sa.Connection, user_id: str) -> None:
    c.execute(email_codes.delete().where(email_codes.c.user_id == user_id))


def address_taken(c: sa.Connection, address: str, user_id: str) -> bool:
    """Another account has verified this address."""
    found = c.execute(sa.select(users.c.id).where(sa.func.lower(users.c.email) == address.lower(),
                                                  users.c.id != user_id)).first()
    return found is not None


def set_verified(c: sa.Connection, user_id: str, address: str) -> None:
    c.execute(users.update().where(users.c.id == user_id).values(email=address))
    c.execute(email_codes.delete().where(email_codes.c.user_id == user_id))


def allowed_recipients(c: sa.Connection, vm_id: str) -> dict[str, str]:
    """lower-cased verified address -> user id: the VM's owner and the users it is shared with (by handle, or by an
    e-mail address some account has verified)."""
    owner = sa.select(users.c.id, users.c.email).join(vms, vms.c.owner_id == users.c.id).where(vms.c.id == vm_id)
    by_user = (sa.select(users.c.id, users.c.email).join(vm_shares, vm_shares.c.user_id == users.c.id)
               .where(vm_shares.c.vm_id == vm_id))
    by_email = (sa.select(users.c.id, users.c.email)
                .join(vm_shares, sa.func.lower(vm_shares.c.email) == sa.func.lower(users.c.email))
                .where(vm_shares.c.vm_id == vm_id))
    found: dict[str, str] = {}
    for query in (owner, by_user, by_email):
        for row in c.execute(query):
            if row.email:
                found[row.email.lower()] = row.id
    return found

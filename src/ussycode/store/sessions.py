"""Queries for browser sign-in: one-time login tokens and hand-off nonces (hashed), web sessions (hashed ids).

Every function takes an open connection (the caller owns the transaction).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from ussycode.store.schema import login_tokens, users, web_sessions


@dataclass(frozen=True)
class SessionRow:
    id_hash: str
    user_id: str
    handle: str
    email: str | None
    host: str
    parent_hash: str | None
    vm_id: str | None
    expires_at: dt.datetime
    revoked_at: dt.datetime | None


def add_one_time(c: sa.Connection, token_hash: str, user_id: str, now: dt.datetime, ttl: dt.timedelta) -> None:
    c.execute(login_tokens.insert().values(token_hash=token_hash, user_id=user_id, created_at=now,
                                           expires_at=now + ttl))


def use_one_time(c: sa.Connection, token_hash: str, now: dt.datetime) -> str | None:
    """Mark a live, unused one-time token used; its user id, or None if it was not live."""
    used = c.execute(login_tokens.update()
                     .where(login_tokens.c.token_hash == token_hash, login_tokens.c.used_at.is_(None),
                            login_tokens.c.expires_at > now)
                     .values(used_at=now)).rowcount
    if used != 1:
        return None
    user_id: str = c.execute(sa.select(login_tokens.c.user_id)
                             .where(login_tokens.c.token_hash == token_hash)).scalar_one()
    return user_id


def user_names(c: sa.Connection, user_id: str) -> tuple[str, str | None] | None:
    row = c.execute(sa.select(users.c.handle, users.c.email).where(users.c.id == user_id)).first()
    return None if row is None else (row.handle, row.email)


def add_session(c: sa.Connection, *, id_hash: str, user_id: str, host: str, parent_hash: str | None,
                vm_id: str | None, now: dt.datetime, expires_at: dt.datetime) -> None:
    c.execute(web_sessions.insert().values(id_hash=id_hash, user_id=user_id, host=host, parent_hash=parent_hash,
                                           vm_id=vm_id, created_at=now, expires_at=expires_at, last_seen_at=now))


def revoke_family(c: sa.Connection, root_hash: str, now: dt.datetime) -> int:
    return int(c.execute(web_sessions.update()
                         .where(sa.or_(web_sessions.c.id_hash == root_hash, web_sessions.c.parent_hash == root_hash),
                                web_sessions.c.revoked_at.is_(None))
                         .values(revoked_at=now)).rowcount)


def purge(c: sa.Connection, cutoff: dt.datetime) -> None:
    c.execute(login_tokens.delete().where(login_tokens.c.expires_at < cutoff))
    c.execute(web_sessions.delete().where(web_sessions.c.expires_at < cutoff))


_Q_SESSION = (sa.select(web_sessions, users.c.handle, users.c.email, users.c.suspended_at)
              .select_from(web_sessions.join(users, users.c.id == web_sessions.c.user_id))
              .where(web_sessions.c.id_hash == sa.bindparam("id_hash")))


def session(c: sa.Connection, id_hash: str) -> SessionRow | None:
    """One session with its user's names (statement built once: forward-auth hot path)."""
    r = c.execute(_Q_SESSION, {"id_hash": id_hash}).first()
    if r is None:
        return None
    # A suspended account's sessions were revoked with it; one made since (a stale login link) is refused too.
    revoked = r.revoked_at if r.suspended_at is None else (r.revoked_at or r.suspended_at)
    return SessionRow(r.id_hash, r.user_id, r.handle, r.email, r.host, r.parent_hash, r.vm_id, r.expires_at,
                      revoked)


def revoke_user(c: sa.Connection, user_id: str, now: dt.datetime) -> int:
    """Revoke every live browser session of a user (suspension)."""
    return int(c.execute(web_sessions.update()
                         .where(web_sessions.c.user_id == user_id, web_sessions.c.revoked_at.is_(None))
                         .values(revoked_at=now)).rowcount)

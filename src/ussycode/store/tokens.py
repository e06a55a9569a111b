"""API token rows (``api_tokens``). Secrets are never stored, only their sha256."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from ussycode.store.schema import api_tokens, vms


@dataclass(frozen=True)
class ApiToken:
    id: str
    user_id: str
    secret_hash: str
    cmds: tuple[str, ...] | None
    vm_id: str | None
    vm_name: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


def _select() -> sa.Select[tuple[object, ...]]:
    return sa.select(api_tokens, vms.c.name.label("vm_name")).select_from(
        api_tokens.outerjoin(vms, vms.c.id == api_tokens.c.vm_id))


def _token(row: sa.Row[tuple[object, ...]]) -> ApiToken:
    m = row._mapping
    cmds = m["cmds"]
    return ApiToken(m["id"], m["user_id"], m["secret_hash"], tuple(cmds) if cmds is not None else None,
                    m["vm_id"], m["vm_name"], m["created_at"], m["expires_at"], m["last_used_at"],
                    m["revoked_at"])


def insert(conn: sa.Connection, *, id: str, user_id: str, secret_hash: str, cmds: list[str] | None,
           vm_id: str | None, created_at: dt.datetime, expires_at: dt.datetime | None) -> None:
    conn.execute(api_tokens.insert().values(id=id, user_id=user_id, prefix=id, secret_hash=secret_hash, cmds=cmds,
                                            vm_id=vm_id, created_at=created_at, expires_at=expires_at))


def by_prefix(conn: sa.Connection, prefix: str) -> ApiToken | None:
    row = conn.execute(_select().where(api_tokens.c.prefix == prefix)).first()
    return _token(row) if row else None


def of_user(conn: sa.Connection, user_id: str) -> list[ApiToken]:
    rows = conn.execute(_select().where(api_tokens.c.user_id == user_id).order_by(api_tokens.c.created_at,
                                                                                    api_tokens.c.id))
    return [_token(r) for r in rows]


def count_active(conn: sa.Connection, user_id: str, now: dt.datetime) -> int:
    q = sa.select(sa.func.count()).select_from(api_tokens).where(
        api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None),
        sa.or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at > now))
    return int(conn.execute(q).scalar_one())


def revoke(conn: sa.Connection, token_id: str, at: dt.datetime) -> None:
    conn.execute(api_tokens.update().where(api_tokens.c.id == token_id).values(revoked_at=at))


def touch(conn: sa.Connection, token_id: str, at: dt.datetime) -> None:
    conn.execute(api_tokens.update().where(api_tokens.c.id == token_id).values(last_used_at=at))

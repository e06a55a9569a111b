"""Users and their SSH keys."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from ussycode.store.schema import ssh_keys, users, utcnow
from ussycode.types import Limits, TrustLevel

QUOTA_KEYS = ("vms", "cpu", "memory_mb", "disk_gb")


@dataclass(frozen=True)
class User:
    id: str
    handle: str
    email: str | None
    trust_level: TrustLevel
    created_at: dt.datetime
    suspended_at: dt.datetime | None = None
    suspend_reason: str = ""
    # Per-user overrides of the tier's limits; a None field keeps the tier's value.
    quota: Limits | None = None

    @property
    def suspended(self) -> bool:
        return self.suspended_at is not None


def quota_from_json(value: object) -> Limits | None:
    if not isinstance(value, dict) or not any(isinstance(value.get(k), int) for k in QUOTA_KEYS):
        return None
    return Limits(*(value.get(k) if isinstance(value.get(k), int) else None for k in QUOTA_KEYS))


@dataclass(frozen=True)
class SshKey:
    id: int
    user_id: str
    fingerprint: str
    key_type: str
    public_key: str
    comment: str
    created_at: dt.datetime


def new_id() -> str:
    return secrets.token_hex(8)


def _user(row: sa.Row[tuple[object, ...]]) -> User:
    m = row._mapping
    return User(m["id"], m["handle"], m["email"], TrustLevel(m["trust_level"]), m["created_at"],
                m["suspended_at"], m["suspend_reason"] or "", quota_from_json(m["quota"]))


def _key(row: sa.Row[tuple[object, ...]]) -> SshKey:
    m = row._mapping
    return SshKey(
        m["id"], m["user_id"], m["fingerprint"], m["key_type"], m["public_key"], m["comment"], m["created_at"]
    )


def create_user(conn: sa.Connection, handle: str, key_type: str, public_key: str, fingerprint: str,
                comment: str = "") -> User:
    """Create a user with its first key. The first user on an empty database is an admin."""
    first = conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one() == 0
    uid, now = new_id(), utcnow()
    level = TrustLevel.ADMIN if first else TrustLevel.NEWBIE
    conn.execute(users.insert().values(id=uid, handle=handle, email=None, trust_level=level, created_at=now))
    add_key(conn, uid, key_type, public_key, fingerprint, comment)
    return User(uid, handle, None, level, now)


def count(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())


# Hot reads are built once: constructing a statement costs more than running it on SQLite.
_BY_ID = sa.select(users).where(users.c.id == sa.bindparam("user_id"))
_BY_FINGERPRINT = sa.select(users).join(ssh_keys, ssh_keys.c.user_id == users.c.id).where(
    ssh_keys.c.fingerprint == sa.bindparam("fingerprint"))
_KEYS_OF = sa.select(ssh_keys).where(ssh_keys.c.user_id == sa.bindparam("user_id")).order_by(ssh_keys.c.id)


def by_id(conn: sa.Connection, user_id: str) -> User | None:
    row = conn.execute(_BY_ID, {"user_id": user_id}).first()
    return _user(row) if row else None


def by_handle(conn: sa.Connection, handle: str) -> User | None:
    row = conn.execute(sa.select(users).where(users.c.handle == handle)).first()
    return _user(row) if row else None


def by_fingerprint(conn: sa.Connection, fingerprint: str) -> User | None:
    row = conn.execute(_BY_FINGERPRINT, {"fingerprint": fingerprint}).first()
    return _user(row) if row else None


def set_trust(conn: sa.Connection, user_id: str, level: TrustLevel) -> None:
    conn.execute(users.update().where(users.c.id == user_id).values(trust_level=level))


def set_suspended(conn: sa.Connection, user_id: str, at: dt.datetime | None, reason: str = "") -> None:
    conn.execute(users.update().where(users.c.id == user_id).values(suspended_at=at, suspend_reason=reason))


def set_quota(conn: sa.Connection, user_id: str, quota: Limits | None) -> None:
    value = None if quota is None else {k: v for k, v in quota.as_json().items() if v is not None} or None
    conn.execute(users.update().where(users.c.id == user_id).values(quota=value))


def delete(conn: sa.Connection, user_id: str) -> None:
    conn.execute(users.delete().where(users.c.id == user_id))


def count_admins(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(users).where(
        users.c.trust_level == TrustLevel.ADMIN, users.c.suspended_at.is_(None))).scalar_one())


def add_key(conn: sa.Connection, user_id: str, key_type: str, public_key: str, fingerprint: str,
            comment: str = "") -> SshKey:
    now = utcnow()
    kid = conn.execute(
        ssh_keys.insert().values(user_id=user_id, fingerprint=fingerprint, key_type=key_type,
                                 public_key=public_key, comment=comment, created_at=now)
    ).inserted_primary_key
    assert kid is not None
    return SshKey(int(kid[0]), user_id, fingerprint, key_type, public_key, comment, now)


def keys_of(conn: sa.Connection, user_id: str) -> list[SshKey]:
    return [_key(r) for r in conn.execute(_KEYS_OF, {"user_id": user_id})]


def key_by_fingerprint(conn: sa.Connection, fingerprint: str) -> SshKey | None:
    row = conn.execute(sa.select(ssh_keys).where(ssh_keys.c.fingerprint == fingerprint)).first()
    return _key(row) if row else None


def remove_key(conn: sa.Connection, key_id: int) -> None:
    conn.execute(ssh_keys.delete().where(ssh_keys.c.id == key_id))


def rename_key(conn: sa.Connection, key_id: int, comment: str) -> None:
    conn.execute(ssh_keys.update().where(ssh_keys.c.id == key_id).values(comment=comment))

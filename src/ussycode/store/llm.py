"""LLM keys (sealed) and token usage rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ussycode.store.schema import llm_keys, llm_usage, users


@dataclass(frozen=True)
class KeyRow:
    provider: str
    sealed: bytes
    hint: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None


def put_key(c: sa.Connection, user_id: str, provider: str, sealed: bytes, hint: str, now: dt.datetime) -> bool:
    """Store (or replace) a key; True if it replaced one."""
    replaced = c.execute(llm_keys.delete().where(llm_keys.c.user_id == user_id,
                                                 llm_keys.c.provider == provider)).rowcount
    c.execute(llm_keys.insert().values(user_id=user_id, provider=provider, sealed=sealed, hint=hint, created_at=now))
    return bool(replaced)


def keys_of(c: sa.Connection, user_id: str) -> list[KeyRow]:
    rows = c.execute(sa.select(llm_keys).where(llm_keys.c.user_id == user_id).order_by(llm_keys.c.provider))
    return [KeyRow(r.provider, bytes(r.sealed), r.hint, r.created_at, r.last_used_at) for r in rows]


_KEY = sa.select(llm_keys.c.sealed).where(llm_keys.c.user_id == sa.bindparam("user_id"),
                                         llm_keys.c.provider == sa.bindparam("provider"))


def sealed_key(c: sa.Connection, user_id: str, provider: str) -> bytes | None:
    value = c.execute(_KEY, {"user_id": user_id, "provider": provider}).scalar()
    return None if value is None else bytes(value)


def remove_key(c: sa.Connection, user_id: str, provider: str) -> bool:
    return bool(c.execute(llm_keys.delete().where(llm_keys.c.user_id == user_id,
                                                  llm_keys.c.provider == provider)).rowcount)


def touch_key(c: sa.Connection, user_id: str, provider: str, now: dt.datetime) -> None:
    c.execute(llm_keys.update().where(llm_keys.c.user_id == user_id, llm_keys.c.provider == provider)
              .values(last_used_at=now))


def add_usage(c: sa.Connection, user_id: str, day: dt.date, provider: str, input_tokens: int,
              output_tokens: int, requests: int = 1) -> None:
    """Count requests and their tokens (an update, or the day's first row)."""
    updated = c.execute(llm_usage.update().where(llm_usage.c.user_id == user_id, llm_usage.c.day == day,
                                                 llm_usage.c.provider == provider)
                        .values(input_tokens=llm_usage.c.input_tokens + input_tokens,
                                output_tokens=llm_usage.c.output_tokens + output_tokens,
                                requests=llm_usage.c.requests + requests)).rowcount
    if not updated:
        c.execute(llm_usage.insert().values(user_id=user_id, day=day, provider=provider, input_tokens=input_tokens,
                                            output_tokens=output_tokens, requests=requests))


_TOKENS_SINCE = (sa.select(sa.func.coalesce(sa.func.sum(llm_usage.c.input_tokens + llm_usage.c.output_tokens), 0))
                 .where(llm_usage.c.user_id == sa.bindparam("user_id"), llm_usage.c.day >= sa.bindparam("since")))


def tokens_since(c: sa.Connection, user_id: str, since: dt.date) -> int:
    return int(c.execute(_TOKENS_SINCE, {"user_id": user_id, "since": since}).scalar_one())


def usage_rows(c: sa.Connection, user_id: str, since: dt.date) -> list[dict[str, Any]]:
    rows = c.execute(sa.select(llm_usage).where(llm_usage.c.user_id == user_id, llm_usage.c.day >= since))
    return [dict(r._mapping) for r in rows]


def usage_page(c: sa.Connection, since: dt.date, limit: int = 200) -> list[dict[str, Any]]:
    """Every user's usage per provider and day since ``since`` (the admin panel), largest first."""
    total = (llm_usage.c.input_tokens + llm_usage.c.output_tokens).label("tokens")
    q = (sa.select(users.c.handle, llm_usage.c.day, llm_usage.c.provider, llm_usage.c.requests,
                   llm_usage.c.input_tokens, llm_usage.c.output_tokens, total)
         .select_from(llm_usage.join(users, users.c.id == llm_usage.c.user_id))
         .where(llm_usage.c.day >= since).order_by(llm_usage.c.day.desc(), total.desc()).limit(limit))
    return [dict(r._mapping) for r in c.execute(q)]


def tokens_on(c: sa.Connection, day: dt.date) -> int:
    q = sa.select(sa.func.coalesce(sa.func.sum(llm_usage.c.input_tokens + llm_usage.c.output_tokens), 0)).where(
        llm_usage.c.day == day)
    return int(c.execute(q).scalar_one())

"""The audit log: every state change writes one row."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ussycode.store.schema import audit_log, utcnow


def record(conn: sa.Connection, *, actor_id: str | None, source: str, action: str, target: str = "",
           **detail: Any) -> None:
    conn.execute(audit_log.insert().values(at=utcnow(), actor_id=actor_id, source=source, action=action,
                                           target=target[:200], detail=detail))


def recent(conn: sa.Connection, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if action:
        q = q.where(audit_log.c.action == action)
    return [dict(r._mapping) for r in conn.execute(q)]

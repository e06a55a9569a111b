"""Audit log filters from a query string, and the CSV export of what they select (streamed, bounded)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import StreamingResponse

from ussycode import durations
from ussycode.auth.identity import Actor
from ussycode.errors import UsageError
from ussycode.services.admin import AdminService
from ussycode.store.schema import iso, utcnow

MAX_SINCE = dt.timedelta(days=3650)
CSV_MAX_ROWS = 100_000
CSV_BATCH = 500
FIELDS = ("actor", "action", "target", "since", "from", "to")


def audit_filters(params: Mapping[str, str]) -> dict[str, str]:
    return {k: str(params.get(k, ""))[:200] for k in FIELDS}


def _day(text: str, what: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise UsageError(f"{what} must be a date like 2026-12-31") from None


def audit_query(f: Mapping[str, str]) -> dict[str, Any]:
    """Filters -> keyword arguments of :meth:`AdminService.audit` (``since`` a duration, ``from``/``to`` days)."""
    since = _day(f.get("from", ""), "from")
    if f.get("since"):
        since = utcnow() - durations.parse_duration(f["since"], longest=MAX_SINCE)
    until = _day(f.get("to", ""), "to")
    return {"actor_handle": f.get("actor", "").strip(), "action": f.get("action", "").strip(),
            "target": f.get("target", "").strip(), "since": since,
            "until": until + dt.timedelta(days=1) if until else None}


def _safe_cell(value: Any) -> str:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or a tab/CR) gets a leading quote."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def audit_csv(svc: AdminService, actor: Actor, params: Mapping[str, str]) -> StreamingResponse:
    query = audit_query(audit_filters(params))
    await svc.audit(actor, **query, limit=1)  # refuse (role, bad filter) before the response starts

    async def rows() -> AsyncIterator[str]:
        buf = io.StringIO()
        out = csv.writer(buf)
        out.writerow(["id", "at", "actor", "source", "action", "target", "detail"])
        before: int | None = None
        sent = 0
        while sent < CSV_MAX_ROWS:
            page = await svc.audit(actor, **query, before=before, limit=CSV_BATCH)
            for r in page.rows:
                out.writerow([r["id"], iso(r["at"]), _safe_cell(r["actor"]), r["source"], _safe_cell(r["action"]),
                              _safe_cell(r["target"]), _safe_cell(json.dumps(r["detail"], sort_keys=True))])
            sent += len(page.rows)
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
            if page.next_before is None:
                return
            before = page.next_before

    name = f"ussycode-audit-{utcnow():%Y%m%dT%H%M%S}.csv"
    return StreamingResponse(rows(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{name}"',
                                      "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

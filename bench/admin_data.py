"""A large instance, generated straight into the database: users (with keys), VMs, tokens and audit rows.

Used by ``bench_admin`` (10,000 users / 50,000 VMs / 1,000,000 audit rows) and by the panel test (smaller).
Rows are inserted in batches through SQLAlchemy Core; the schema comes from the migrations (``Store.migrate``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

import sqlalchemy as sa

from ussycode.runtime.fake import FakeVm
from ussycode.store.db import Store
from ussycode.store.schema import api_tokens, audit_log, ssh_keys, users, vms
from ussycode.types import VmSpec

BATCH = 5_000
STATUSES = ("stopped", "stopped", "stopped", "error")
RUNNING_EVERY = 250  # one VM in 250 runs (200 of 50,000): what one host runs; the rest are stopped or failed
TIERS = ("newbie", "newbie", "newbie", "citizen", "citizen", "operator")
ACTIONS = ("vm.create", "vm.start", "vm.stop", "vm.remove", "share.public", "token.create", "key.add", "mail.send")


def _chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


def fake_host(vm_rows: list[dict[str, Any]]) -> dict[str, FakeVm]:
    """The fake runtime's view of those VMs (the running ones run), so a server starting on the database finds
    every VM where the database says it is."""
    return {r["id"]: FakeVm(VmSpec(r["id"], r["name"], r["image"], r["cpu"], r["memory_mb"], r["disk_gb"]),
                            running=r["status"] == "running") for r in vm_rows}


def populate(store: Store, *, n_users: int, n_vms: int, n_audit: int,
             admin_handle: str = "boss") -> dict[str, FakeVm]:
    """Fill an empty, migrated database. The first user (``admin_handle``) is the admin. Returns the VMs as a
    :class:`~ussycode.runtime.fake.FakeRuntime` host (``FakeRuntime(populate(...))``)."""
    now = dt.datetime(2026, 12, 1)
    ids = [secrets.token_hex(8) for _ in range(n_users)]
    user_rows = [{"id": uid, "handle": admin_handle if i == 0 else f"user{i:05d}",
                  "email": None if i % 3 else f"user{i}@example.org",
                  "trust_level": "admin" if i == 0 else TIERS[i % len(TIERS)],
                  "created_at": now - dt.timedelta(minutes=i), "suspended_at": now if i % 97 == 5 else None,
                  "suspend_reason": "", "quota": None} for i, uid in enumerate(ids)]
    key_rows = [{"user_id": uid, "fingerprint": "SHA256:" + hashlib.sha256(uid.encode()).hexdigest()[:43],
                 "key_type": "ssh-ed25519", "public_key": f"ssh-ed25519 AAAA{uid}", "comment": "",
                 "created_at": now} for uid in ids]
    vm_rows = [{"id": secrets.token_hex(16), "name": f"vm-{i:06d}", "owner_id": ids[i % n_users], "image": "ussyuntu",
                "status": "running" if i % RUNNING_EVERY == 1 else STATUSES[i % len(STATUSES)],
                "desired": "running" if i % RUNNING_EVERY == 1 else "stopped", "cpu": 1, "memory_mb": 1024,
                "disk_gb": 5, "env": {}, "runtime": "container", "runtime_state": {}, "error": "",
                "created_at": now, "updated_at": now, "id_base": None} for i in range(n_vms)]
    token_rows = [{"id": f"tok{i:08d}", "user_id": ids[i % n_users], "prefix": f"tok{i:08d}",
                   "secret_hash": "0" * 64, "cmds": None, "vm_id": None, "created_at": now, "expires_at": None,
                   "last_used_at": None, "revoked_at": None} for i in range(min(n_users, 20_000))]
    with store.engine.begin() as c:
        for table, rows in ((users, user_rows), (ssh_keys, key_rows), (vms, vm_rows), (api_tokens, token_rows)):
            for chunk in _chunks(rows):
                c.execute(table.insert(), chunk)
    done = 0
    while done < n_audit:
        n = min(BATCH * 4, n_audit - done)
        rows = [{"at": now - dt.timedelta(seconds=n_audit - done - j), "actor_id": ids[(done + j) % n_users],
                 "source": "ssh", "action": ACTIONS[(done + j) % len(ACTIONS)],
                 "target": f"vm-{(done + j) % 50_000:06d}",
                 "detail": {}} for j in range(n)]
        with store.engine.begin() as c:
            c.execute(audit_log.insert(), rows)
        done += n
    with store.engine.begin() as c:
        c.execute(sa.text("ANALYZE")) if store.url.startswith("sqlite") else None
    return fake_host(vm_rows)

"""VM rows and their tags."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ussycode.store.schema import utcnow, vm_tags, vms
from ussycode.types import VmStatus


@dataclass(frozen=True)
class Vm:
    id: str
    name: str
    owner_id: str
    image: str
    status: VmStatus
    desired: str
    cpu: int
    memory_mb: int
    disk_gb: int
    env: dict[str, str]
    runtime: str
    runtime_state: dict[str, Any]
    error: str
    created_at: dt.datetime
    updated_at: dt.datetime
    tags: tuple[str, ...] = field(default=())
    id_base: int | None = None


def _vm(row: sa.Row[tuple[object, ...]], tags: tuple[str, ...] = ()) -> Vm:
    m = row._mapping
    return Vm(
        m["id"], m["name"], m["owner_id"], m["image"], VmStatus(m["status"]), m["desired"], m["cpu"],
        m["memory_mb"], m["disk_gb"], dict(m["env"] or {}), m["runtime"], dict(m["runtime_state"] or {}),
        m["error"], m["created_at"], m["updated_at"], tags, m["id_base"],
    )


_TAGS_OF = sa.select(vm_tags.c.tag).where(vm_tags.c.vm_id == sa.bindparam("vm_id")).order_by(vm_tags.c.tag)


def _with_tags(conn: sa.Connection, rows: list[sa.Row[tuple[object, ...]]]) -> list[Vm]:
    if len(rows) == 1:  # one VM (by id, by name): a statement built once, not an IN list
        vm_id = rows[0]._mapping["id"]
        return [_vm(rows[0], tuple(conn.execute(_TAGS_OF, {"vm_id": vm_id}).scalars()))]
    ids = [r._mapping["id"] for r in rows]
    tags: dict[str, list[str]] = {i: [] for i in ids}
    if ids:
        for vm_id, tag in conn.execute(
            sa.select(vm_tags.c.vm_id, vm_tags.c.tag).where(vm_tags.c.vm_id.in_(ids)).order_by(vm_tags.c.tag)
        ):
            tags[vm_id].append(tag)
    return [_vm(r, tuple(tags[r._mapping["id"]])) for r in rows]


def insert(conn: sa.Connection, *, id: str, name: str, owner_id: str, image: str, cpu: int, memory_mb: int,
           disk_gb: int, env: dict[str, str], runtime: str, status: VmStatus = VmStatus.CREATING,
           desired: str = "running", tags: tuple[str, ...] = (), id_base: int | None = None) -> None:
    now = utcnow()
    conn.execute(vms.insert().values(
        id=id, name=name, owner_id=owner_id, image=image, status=status, desired=desired, cpu=cpu,
        memory_mb=memory_mb, disk_gb=disk_gb, env=env, runtime=runtime, runtime_state={}, error="",
        created_at=now, updated_at=now, id_base=id_base,
    ))
    for tag in tags:
        conn.execute(vm_tags.insert().values(vm_id=id, tag=tag))


_BY_NAME = sa.select(vms).where(vms.c.name == sa.bindparam("name"))
ARENA_TAG = "arena"  # a match's VM: outside its owner's VM quota
# VMs that count against the owner's quota: an arena match's VMs do not.
_COUNT_OF_OWNER = sa.select(sa.func.count()).select_from(vms).where(
    vms.c.owner_id == sa.bindparam("owner_id"),
    ~sa.exists().where(vm_tags.c.vm_id == vms.c.id, vm_tags.c.tag == ARENA_TAG))


def by_name(conn: sa.Connection, name: str) -> Vm | None:
    row = conn.execute(_BY_NAME, {"name": name}).first()
    return _with_tags(conn, [row])[0] if row else None


_BY_ID = sa.select(vms).where(vms.c.id == sa.bindparam("vm_id"))


def by_id(conn: sa.Connection, vm_id: str) -> Vm | None:
    row = conn.execute(_BY_ID, {"vm_id": vm_id}).first()
    return _with_tags(conn, [row])[0] if row else None


def of_owner(conn: sa.Connection, owner_id: str) -> list[Vm]:
    rows = conn.execute(sa.select(vms).where(vms.c.owner_id == owner_id).order_by(vms.c.created_at.desc(),
                                                                                  vms.c.name)).all()
    return _with_tags(conn, list(rows))


def all_vms(conn: sa.Connection) -> list[Vm]:
    return _with_tags(conn, list(conn.execute(sa.select(vms).order_by(vms.c.name)).all()))


_RUNNING_NAMES = sa.select(vms.c.id, vms.c.name).where(vms.c.status == VmStatus.RUNNING.value)


def running_names(conn: sa.Connection) -> dict[str, str]:
    """VM id -> name of every running VM (the routing table's read: two columns, no tags)."""
    return {vm_id: name for vm_id, name in conn.execute(_RUNNING_NAMES)}


_INDEX = sa.select(vms.c.id, vms.c.name, vms.c.status)


def index(conn: sa.Connection) -> list[tuple[str, str, VmStatus]]:
    """(id, name, status) of every VM: the watcher's periodic read (three columns, no tags)."""
    return [(vm_id, name, VmStatus(status)) for vm_id, name, status in conn.execute(_INDEX)]


def id_bases(conn: sa.Connection) -> list[int]:
    """Every id range base in use (a row exists while its VM or disk does)."""
    return [int(b) for b in conn.execute(sa.select(vms.c.id_base).where(vms.c.id_base.is_not(None))).scalars()]


def count_of_owner(conn: sa.Connection, owner_id: str) -> int:
    return int(conn.execute(_COUNT_OF_OWNER, {"owner_id": owner_id}).scalar_one())


def update(conn: sa.Connection, vm_id: str, **values: Any) -> None:
    conn.execute(vms.update().where(vms.c.id == vm_id).values(updated_at=utcnow(), **values))


def delete(conn: sa.Connection, vm_id: str) -> None:
    conn.execute(vm_tags.delete().where(vm_tags.c.vm_id == vm_id))
    conn.execute(vms.delete().where(vms.c.id == vm_id))


def add_tag(conn: sa.Connection, vm_id: str, tag: str) -> bool:
    exists = conn.execute(sa.select(vm_tags).where(vm_tags.c.vm_id == vm_id, vm_tags.c.tag == tag)).first()
    if exists:
        return False
    conn.execute(vm_tags.insert().values(vm_id=vm_id, tag=tag))
    return True


def remove_tag(conn: sa.Connection, vm_id: str, tag: str) -> bool:
    return conn.execute(vm_tags.delete().where(vm_tags.c.vm_id == vm_id, vm_tags.c.tag == tag)).rowcount > 0

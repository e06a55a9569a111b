"""The store on SQLite and on PostgreSQL (USSYCODE_TEST_PG_URL, set up by `make test`)."""

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ussycode.store import audit, users, vms
from ussycode.store.db import Store, backup_sqlite, head_revision
from ussycode.store.schema import metadata
from ussycode.types import TrustLevel, VmStatus

PG_URL = os.environ.get("USSYCODE_TEST_PG_URL")


def empty_store(backend: str, tmp_path: Path) -> Store:
    """A store with no tables: a new SQLite file, or the test PostgreSQL database emptied."""
    if backend == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'u.db'}")
    if not PG_URL:
        pytest.skip("PostgreSQL not available: set USSYCODE_TEST_PG_URL (make test starts a local cluster)")
    s = Store(PG_URL)
    with s.engine.begin() as conn:
        for table in sa.inspect(conn).get_table_names():  # every table, those of later migrations too
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
    return s


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = empty_store(request.param, tmp_path)
    s.migrate()
    yield s
    s.close()


def test_migrations_create_exactly_the_schema(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head_revision()
    assert store.migrate() is None  # idempotent


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'w.db'}")
    s.migrate()
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    s.close()


def test_backup_is_a_consistent_copy(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'b.db'}")
    s.migrate()
    with s.engine.begin() as conn:
        users.create_user(conn, "demo", "ssh-ed25519", "ssh-ed25519 AAAA", "SHA256:abc")
    backup = backup_sqlite(s.engine, "0001")
    assert backup is not None and backup.exists()
    copy = sqlite3.connect(backup)
    assert copy.execute("select handle from users").fetchall() == [("demo",)]
    copy.close()
    s.close()


async def test_users_keys_and_first_admin(store: Store) -> None:
    first = await store.write(lambda c: users.create_user(c, "alice", "ssh-ed25519", "k1", "SHA256:a"))
    second = await store.write(lambda c: users.create_user(c, "bob", "ssh-ed25519", "k2", "SHA256:b"))
    assert first.trust_level is TrustLevel.ADMIN and second.trust_level is TrustLevel.NEWBIE
    found = await store.read(lambda c: users.by_fingerprint(c, "SHA256:b"))
    assert found is not None and found.handle == "bob"
    with pytest.raises(sa.exc.IntegrityError):
        await store.write(lambda c: users.create_user(c, "alice", "ssh-ed25519", "k3", "SHA256:c"))
    with pytest.raises(sa.exc.IntegrityError):
        await store.write(lambda c: users.create_user(c, "carol", "ssh-ed25519", "k1", "SHA256:a"))
    # a failed transaction leaves nothing behind
    assert await store.read(lambda c: users.by_handle(c, "carol")) is None


async def test_vms_tags_and_audit(store: Store) -> None:
    owner = await store.write(lambda c: users.create_user(c, "alice", "ssh-ed25519", "k1", "SHA256:a"))

    def make(c: sa.Connection) -> None:
        vms.insert(c, id="v1", name="box1", owner_id=owner.id, image="ussyuntu", cpu=1, memory_mb=512,
                   disk_gb=1, env={"A": "b"}, runtime="container", tags=("web",))
        audit.record(c, actor_id=owner.id, source="ssh", action="vm.create", target="box1", cpu=1)

    await store.write(make)
    vm = await store.read(lambda c: vms.by_name(c, "box1"))
    assert vm is not None and vm.status is VmStatus.CREATING and vm.env == {"A": "b"} and vm.tags == ("web",)
    await store.write(lambda c: vms.update(c, "v1", status=VmStatus.RUNNING, runtime_state={"pid": 1}))
    vm = await store.read(lambda c: vms.by_id(c, "v1"))
    assert vm is not None and vm.status is VmStatus.RUNNING and vm.runtime_state == {"pid": 1}
    assert await store.write(lambda c: vms.add_tag(c, "v1", "db")) is True
    assert await store.write(lambda c: vms.add_tag(c, "v1", "db")) is False
    rows = await store.read(lambda c: audit.recent(c))
    assert rows[0]["action"] == "vm.create" and rows[0]["detail"] == {"cpu": 1}
    await store.write(lambda c: vms.delete(c, "v1"))
    assert await store.read(lambda c: vms.by_name(c, "box1")) is None


async def test_parallel_writes_never_lock(store: Store) -> None:
    owner = await store.write(lambda c: users.create_user(c, "alice", "ssh-ed25519", "k1", "SHA256:a"))

    async def one(i: int) -> None:
        await store.write(lambda c: audit.record(c, actor_id=owner.id, source="ssh", action="x", target=str(i)))
        await store.read(lambda c: users.by_id(c, owner.id))

    await asyncio.gather(*(one(i) for i in range(200)))
    rows = await store.read(lambda c: audit.recent(c, limit=1000, action="x"))
    assert len(rows) == 200


async def test_cached_reads_last_until_the_next_write(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = await store.write(lambda c: users.create_user(c, "alice", "ssh-ed25519", "k1", "SHA256:a"))
    reads = {"n": 0}

    def tier(c: sa.Connection) -> TrustLevel:
        reads["n"] += 1
        user = users.by_id(c, alice.id)
        assert user is not None
        return user.trust_level

    assert await store.read_cached(("tier", alice.id), tier) is TrustLevel.ADMIN
    assert await store.read_cached(("tier", alice.id), tier) is TrustLevel.ADMIN
    assert reads["n"] == 1  # the second came from memory
    await store.write(lambda c: users.set_trust(c, alice.id, TrustLevel.CITIZEN))  # any write drops it
    assert await store.read_cached(("tier", alice.id), tier) is TrustLevel.CITIZEN and reads["n"] == 2

    # a write while the read runs: the value read is not kept (it may predate the write)
    def racing(c: sa.Connection) -> TrustLevel:
        store.generation += 1  # what Store.write does when it ends
        return tier(c)

    await store.read_cached(("race", alice.id), racing)
    assert await store.read_cached(("race", alice.id), tier) is TrustLevel.CITIZEN and reads["n"] == 4

    # another process's write (no generation bump here) shows once the entry's time is up
    assert await store.read_cached(("tier", alice.id), tier) is TrustLevel.CITIZEN
    with store.engine.begin() as c:
        users.set_trust(c, alice.id, TrustLevel.OPERATOR)
    assert await store.read_cached(("tier", alice.id), tier) is TrustLevel.CITIZEN
    import time

    later = time.monotonic() + 60
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert await store.read_cached(("tier", alice.id), tier) is TrustLevel.OPERATOR
    def nobody(c: sa.Connection) -> object:
        reads["n"] += 1
        return users.by_handle(c, "nobody")

    before = reads["n"]
    assert await store.read_cached(("nobody",), nobody) is None
    assert await store.read_cached(("nobody",), nobody) is None and reads["n"] == before + 1  # "nothing" is kept too


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_0003_hashes_links_and_keeps_claims(backend: str, tmp_path: Path) -> None:
    """Upgrading a 0002 database with live data: link tokens become hashes (the old links keep working, for the
    main URL), VM-host sessions are revoked (they had no VM id), custom-domain claims survive."""
    from alembic import command

    from ussycode.auth.links import link_token_hash
    from ussycode.store.db import _alembic_config

    s = empty_store(backend, tmp_path)
    with s.engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0002")
        now = "2026-01-01 00:00:00"
        conn.exec_driver_sql(f"insert into users values ('u1', 'alice', null, 'admin', '{now}')")
        conn.exec_driver_sql(
            "insert into vms (id, name, owner_id, image, status, desired, cpu, memory_mb, disk_gb, env, runtime, "
            f"runtime_state, error, created_at, updated_at) values ('v1', 'web', 'u1', 'i', 'running', 'running', "
            f"1, 512, 1, '{{}}', 'container', '{{}}', '', '{now}', '{now}')")
        conn.exec_driver_sql(f"insert into share_links values ('tok-abcdef123456', 'v1', 'u1', '{now}', null, 3)")
        conn.exec_driver_sql(f"insert into web_sessions values ('root', 'u1', 'localhost', null, '{now}', "
                             f"'2099-01-01 00:00:00', null, null)")
        conn.exec_driver_sql(f"insert into web_sessions values ('child', 'u1', 'web.localhost', 'root', '{now}', "
                             f"'2099-01-01 00:00:00', null, null)")
        conn.exec_driver_sql(f"insert into custom_domains values ('shop.example.com', 'v1', 'ussycode-x', '{now}', "
                             f"'{now}')")
    s.migrate()
    with s.engine.connect() as conn:
        links = conn.exec_driver_sql("select id, token_hash, vm_id, port, uses from share_links").all()
        sessions = dict(conn.exec_driver_sql("select id_hash, revoked_at from web_sessions").all())
        claims = conn.exec_driver_sql("select domain, vm_id, verified_at from custom_domains").all()
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    ((link_id, token_hash, vm_id, port, uses),) = links
    assert token_hash == link_token_hash("tok-abcdef123456") and (vm_id, port, uses) == ("v1", 8080, 3)
    assert len(link_id) == 10
    assert sessions["root"] is None and sessions["child"] is not None
    assert [(d, v) for d, v, _ in claims] == [("shop.example.com", "v1")] and claims[0][2] is not None
    s.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_0004_gives_existing_vms_private_id_ranges(backend: str, tmp_path: Path) -> None:
    from alembic import command

    from ussycode.runtime import idmap
    from ussycode.store.db import _alembic_config

    s = empty_store(backend, tmp_path)
    with s.engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0003")
        conn.exec_driver_sql("INSERT INTO users (id, handle, trust_level, created_at) "
                             "VALUES ('u1', 'old', 'newbie', '2026-01-01 00:00:00')")
        for i, name in enumerate(("older", "newer")):
            conn.exec_driver_sql(
                "INSERT INTO vms (id, name, owner_id, image, status, desired, cpu, memory_mb, disk_gb, env, runtime, "
                f"runtime_state, error, created_at, updated_at) VALUES ('v{i}', '{name}', 'u1', 'i', 'running', "
                f"'running', 1, 512, 1, '{{}}', 'container', '{{}}', '', '2026-01-0{i + 1} 00:00:00', "
                "'2026-01-01 00:00:00')")
    s.migrate()
    with s.engine.connect() as conn:
        got = dict(conn.exec_driver_sql("SELECT name, id_base FROM vms").all())
    assert got == {"older": idmap.base_of_slot(0), "newer": idmap.base_of_slot(1)}
    # New VMs take the next free range.
    with s.engine.begin() as conn:
        assert idmap.first_free_base(vms.id_bases(conn)) == idmap.base_of_slot(2)
    s.close()

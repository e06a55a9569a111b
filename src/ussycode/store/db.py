"""Engine, connection discipline and migrations.

One writer at a time: every write runs in a single dedicated thread, in order (no "database is locked" under
load); reads run on a small thread pool. SQLite gets WAL, a busy timeout and foreign keys. Migrations (Alembic)
run at start-up, after the SQLite file is backed up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ussycode.store.cache import GenerationCache
from ussycode.store.schema import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATIONS = Path(__file__).parent / "migrations"
CACHED_READ_TTL = 2.0  # seconds a read_cached value may miss another process's write


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8, max_overflow=8
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)


def _alembic_config(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def migrate(engine: sa.Engine) -> Path | None:
    """Bring the schema to head. Backs up a SQLite file first when there is anything to do; returns the backup."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return None
    backup = backup_sqlite(engine, current) if current is not None else None
    if backup:
        log.info("backed up the database to %s before migrating %s -> %s", backup, current, head)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "head")
    return backup


def backup_sqlite(engine: sa.Engine, tag: str) -> Path | None:
    """A consistent copy of a SQLite database file (even in WAL mode) beside it; None for other databases."""
    db_file = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not db_file or db_file == ":memory:" or not Path(db_file).exists():
        return None
    backup = Path(f"{db_file}.bak-{tag}-{utcnow():%Y%m%dT%H%M%S}")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM INTO ?", (str(backup),))
    return backup


class Store:
    """The DB handle every service uses: ``await store.read(fn)`` / ``await store.write(fn)``.

    ``fn`` receives a :class:`sqlalchemy.Connection` inside a transaction. Writes run in order on one writer
    thread; reads run on a small pool of reader threads (as Datasette does), never on the event loop: a read
    over thousands of rows takes tens of milliseconds, and every SSH session and proxied request would wait
    for it. ``fn`` must not touch the loop (it runs in another thread).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-write")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="db-read")
        # Bumped after every write: a cache of reads (forward-auth's access inputs) tags each entry with the
        # generation it was read at and drops it once any write happened since. Single process only.
        self.generation = 0
        # Called on the loop right after each bump, before the write's caller goes on (grants Caddy keeps).
        self.on_write: list[Callable[[], None]] = []
        self._cached: GenerationCache[tuple[object]] = GenerationCache(max_entries=4096, ttl=CACHED_READ_TTL)

    def migrate(self) -> Path | None:
        return migrate(self.engine)

    def _run(self, fn: Callable[[sa.Connection], T]) -> T:
        with self.engine.begin() as conn:
            return fn(conn)

    async def write(self, fn: Callable[[sa.Connection], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, self._run, fn)
        finally:
            # Caches of what was read before this write are stale from now on (see ``generation``); bumped on
            # the loop once the write is over, before its caller goes on.
            self.generation += 1
            for hook in self.on_write:
                hook()

    async def read(self, fn: Callable[[sa.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._run, fn)

    async def read_cached(self, key: Hashable, fn: Callable[[sa.Connection], T]) -> T:
        """:meth:`read`, remembered under ``key`` until this store's next write (or :data:`CACHED_READ_TTL`
        seconds, for writes by another process). The value is shared: callers must not change it."""
        generation = self.generation  # taken before the read: a write while it runs makes the entry stale
        hit = self._cached.get(key, generation)
        if hit is not None:
            return cast("T", hit[0])
        value = await self.read(fn)
        self._cached.put(key, generation, (value,))  # boxed: a None read (nothing there) is kept too
        return value

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.engine.dispose()



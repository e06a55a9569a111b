"""Online backups of the database and their restore (``ussycode backup --to FILE``, ``ussycode restore FILE``).

SQLite: ``VACUUM INTO`` copies the database as one read transaction sees it, so a backup taken while the server
writes is consistent (WAL readers never block writers); the copy is checked with ``PRAGMA integrity_check``
before it replaces ``FILE`` (written beside it, then renamed; mode 0600). PostgreSQL: ``pg_dump --format=custom``
and ``pg_restore --clean``, with the connection's password passed in the environment, never on a command line.

A running server holds ``<data-dir>/run/server.lock``; ``restore`` refuses while anyone holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from ussycode.errors import Conflict, NotFound, RuntimeFailure, UsageError


def sqlite_file(url: str) -> Path | None:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise UsageError("an in-memory database has nothing to back up")
    return Path(parsed.database)


def _pg_env(url: str) -> dict[str, str]:
    u = sa.engine.make_url(url)
    env = {**os.environ, "PGDATABASE": u.database or "", "PGUSER": u.username or "",
           "PGHOST": u.host or "", "PGPORT": str(u.port or 5432)}
    if u.password:
        env["PGPASSWORD"] = str(u.password)
    return env


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeFailure(f"{name} is not installed (apt-get install postgresql-client)")
    return path


def integrity(path: Path) -> str:
    """``ok``, or what SQLite's integrity check found."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
            conn.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error as exc:
        return str(exc)
    return "; ".join(str(r[0]) for r in rows)


def backup(url: str, dest: Path) -> str:
    """A consistent copy of the database at ``dest``; returns a one-line summary."""
    dest = dest.absolute()
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory; give a file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    db = sqlite_file(url)
    try:
        if db is not None:
            if not db.exists():
                raise NotFound(f"no database at {db}")
            with contextlib.closing(sqlite3.connect(str(db), timeout=30)) as conn:
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("VACUUM INTO ?", (str(tmp),))
            found = integrity(tmp)
            if found != "ok":
                raise RuntimeFailure(f"the copy failed its integrity check: {found[:200]}")
        else:
            result = subprocess.run([_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={tmp}"],
                                    env=_pg_env(url), capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeFailure("pg_dump failed", evidence=result.stderr.strip()[-2000:])
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    kind = "SQLite" if db is not None else "PostgreSQL custom-format"
    return f"{kind} backup written to {dest} ({dest.stat().st_size} bytes)"


def hold_server_lock(run_dir: Path) -> IO[bytes] | None:
    """Take ``run/server.lock`` for a running server (None if someone else holds it). Keep the file open."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / "server.lock", "ab")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def restore(url: str, src: Path, run_dir: Path) -> str:
    """Bring a backup back (the server must be stopped). The database it replaces is kept beside it."""
    src = src.absolute()
    if not src.is_file():
        raise NotFound(f"no backup file at {src}")
    lock = hold_server_lock(run_dir)
    if lock is None:
        raise Conflict("the server is running on this data dir; stop it before restoring")
    try:
        db = sqlite_file(url)
        if db is not None:
            found = integrity(src)
            if found != "ok":
                raise UsageError(f"{src} is not a sound SQLite database: {found[:200]}")
            kept = db.with_name(db.name + ".before-restore")
            staged = db.with_name(f".{db.name}.restoring")
            shutil.copyfile(src, staged)
            os.chmod(staged, 0o600)
            if db.exists():
                with contextlib.closing(sqlite3.connect(str(db))) as conn:  # fold the WAL in before keeping it
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                shutil.copyfile(db, kept)
            for side in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                side.unlink(missing_ok=True)
            os.replace(staged, db)
            return f"restored {src} into {db}" + (f" (the previous database is kept at {kept})"
                                                  if kept.exists() else "")
        result = subprocess.run([_tool("pg_restore"), "--clean", "--if-exists", "--no-owner",
                                 f"--dbname={sa.engine.make_url(url).database}", str(src)],
                                env=_pg_env(url), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeFailure("pg_restore failed", evidence=result.stderr.strip()[-2000:])
        return f"restored {src} into the PostgreSQL database"
    finally:
        lock.close()

"""Connections: resolve the configured (or embedded) URLs and open them the same way everywhere."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import Engine, make_url

from sluice.shared.settings import Settings


def quote(name: str) -> str:
    """An SQL identifier, quoted the same way in PostgreSQL and SQLite (D1)."""
    return '"' + name.replace('"', '""') + '"'


def is_busy(exc: BaseException) -> bool:
    """Whether a SQLite error is another writer holding the database (worth retrying)."""
    message = str(exc)
    return "locked" in message or "busy" in message


def postgres_url(settings: Settings) -> str:
    """SLUICE_POSTGRES_URL, or the embedded server of the data folder (started on demand)."""
    if settings.postgres_url:
        return settings.postgres_url
    from sluice.shared.embedded import ensure_postgres

    return ensure_postgres(settings.data_dir)


def broker_url(settings: Settings) -> str:
    """SLUICE_BROKER_URL, or the embedded Redis of the data folder (started on demand)."""
    if settings.broker_url:
        return settings.broker_url
    from sluice.shared.embedded import ensure_redis

    return ensure_redis(settings.data_dir)


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg2://…) as a DSN psycopg2.connect accepts."""
    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_engine(url: str) -> Engine:
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg2")
    return sqlalchemy.create_engine(u, pool_pre_ping=True, pool_size=2, max_overflow=2)


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switching a new file to WAL needs an exclusive lock and does not wait on the busy
    handler, so several processes opening a fresh file at once retry briefly."""
    for attempt in range(50):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or attempt == 49:
                raise
            time.sleep(0.02 * (attempt + 1))


def sqlite_connect(
    path: Path, busy_timeout_ms: int = 30_000, cache_mib: int = 128
) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN IMMEDIATE ourselves) with D1's semantics:
    foreign keys on. WAL lets readers run while one writer writes; the busy timeout makes a second
    writer wait for the lock instead of failing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    _set_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    # A large cache and rare checkpoints are what make bulk inserts fast: random-key index pages
    # stay in memory instead of being written back and read again. A fixed size keeps a
    # worker's memory bounded (the cache is per connection, and part of its RSS).
    conn.execute(f"PRAGMA cache_size={-1024 * int(cache_mib)}")
    conn.execute("PRAGMA wal_autocheckpoint=20000")
    return conn

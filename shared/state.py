"""The state store: Sluice's own bookkeeping, in PostgreSQL or in the SQLite sink's file.

It holds source runs (`source_runs`), cursors (`source_progress`), one-time migrations
(`source_migrations`, `source_migration_pages`), snapshot hashes (`source_snapshots`) and dead
letters (`failed_ingestions`). Both schemas (schema/postgres, schema/sqlite) define these tables;
the few SQL differences between the two dialects are answered here, so the modules that own each
table (producers/produce.py, producers/cursors.py, shared/letters.py, …) write one query.

`[pipeline] state` chooses the store: "postgres", "sqlite", or "auto" (the default): PostgreSQL
when one is configured or a stream writes there, else the SQLite file, so a SQLite-only
deployment needs no PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from sluice.shared.settings import Settings

Dialect = Literal["postgresql", "sqlite"]


class StateStore:
    """One engine on the state database, and the dialect's answers to what differs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        name = engine.dialect.name
        if name not in ("postgresql", "sqlite"):
            raise ValueError(f"state store on {name!r}: expected postgresql or sqlite")
        self.dialect: Dialect = "postgresql" if name == "postgresql" else "sqlite"
        self._writer = engine.execution_options(sluice_write=True)

    @property
    def name(self) -> str:
        """The store as operators call it: "postgres" or "sqlite"."""
        return "postgres" if self.dialect == "postgresql" else "sqlite"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that writes. On SQLite it takes the write lock at BEGIN (IMMEDIATE), so
        a read followed by a write never fails on a lock upgrade under concurrent writers."""
        with self._writer.begin() as conn:
            yield conn

    def ts(self, t: datetime) -> Any:
        """A time as this store's columns hold it: timestamptz, or ISO-8601 UTC text in SQLite
        (milliseconds, like the schema's defaults, so text order is time order)."""
        if self.dialect == "postgresql":
            return t
        return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def now(self) -> Any:
        return self.ts(datetime.now(UTC))

    def json(self, param: str) -> str:
        """A bound JSON text as the payload column takes it (jsonb, or text)."""
        return f"CAST(:{param} AS jsonb)" if self.dialect == "postgresql" else f":{param}"

    def contains(self, column: str, param: str) -> str:
        """Case-insensitive substring match of a bound pattern (`%text%`)."""
        op = "ILIKE" if self.dialect == "postgresql" else "LIKE"
        return f"{column} {op} :{param}"

    def dispose(self) -> None:
        self.engine.dispose()


def read_time(value: Any) -> datetime | None:
    """A time as either store returns it (timestamptz, or ISO-8601 text in SQLite), in UTC."""
    if value is None:
        return None
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def state_kind(settings: Settings) -> Literal["postgres", "sqlite"]:
    """Where the state lives: the configured store; for "auto", PostgreSQL when one is
    configured (SLUICE_POSTGRES_URL) or a stream of the configured sources writes there, else
    the SQLite file."""
    chosen = settings.pipeline.state
    if chosen != "auto":
        return chosen
    has_postgres = settings.postgres_url or "postgres" in settings.sinks_fed
    return "postgres" if has_postgres else "sqlite"


def sqlite_engine(path: Path, busy_timeout_ms: int) -> Engine:
    """A SQLAlchemy engine on a SQLite file with the sinks' settings (WAL, foreign keys, a busy
    timeout), whose write transactions start with BEGIN IMMEDIATE."""
    from sluice.shared.database import sqlite_connect

    engine = sqlalchemy.create_engine(
        f"sqlite:///{path}",
        creator=lambda: sqlite_connect(path, busy_timeout_ms, cache_mib=8),
        pool_size=2,
        max_overflow=4,
    )

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sluice_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def open_state(settings: Settings, postgres_url: str | None = None) -> StateStore:
    """The deployment's state store (`postgres_url`: the resolved PostgreSQL URL, when known)."""
    if state_kind(settings) == "sqlite":
        return StateStore(
            sqlite_engine(settings.sqlite_path, settings.pipeline.sqlite_busy_timeout_ms)
        )
    from sluice.shared.database import postgres_engine
    from sluice.shared.database import postgres_url as resolve

    return StateStore(postgres_engine(postgres_url or resolve(settings)))

"""What the sinks hold, for `/stats` and the console's overview: rows per stream table, the
schema version each sink's database is migrated to, and the records each sink committed per
minute over the last hour.

Read from the PostgreSQL sink and the SQLite sink file, each on its own: a sink that cannot be
read is reported under `errors` and the others still are. The remote D1 sink is left out (each
read there is a billed API call).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from sluice.ops.status import sqlite_reader
from sluice.shared.database import quote
from sluice.shared.settings import Settings

WINDOW = timedelta(hours=1)


@dataclass
class SinkStats:
    """One sink's database: its tables' row counts, schema version, and recent throughput."""

    sink: str
    schema_version: str | None = None
    tables: dict[str, int] = field(default_factory=dict)
    records_last_hour: int | None = None

    @property
    def records_per_minute(self) -> float | None:
        if self.records_last_hour is None:
            return None
        return round(self.records_last_hour / (WINDOW.total_seconds() / 60), 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tables": dict(sorted(self.tables.items())),
            "records_last_hour": self.records_last_hour,
            "records_per_minute": self.records_per_minute,
        }


@dataclass
class Stats:
    time: datetime
    sinks: dict[str, SinkStats] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(timespec="seconds"),
            "sinks": {name: s.as_dict() for name, s in sorted(self.sinks.items())},
            "errors": self.errors,
        }


def _tables(settings: Settings, sink: str) -> dict[str, list[str]]:
    """The tables the configured streams write in `sink`, with the streams writing each."""
    out: dict[str, list[str]] = {}
    for name, stream in sorted(settings.streams.items()):
        if sink in stream.sinks:
            out.setdefault(stream.table, []).append(name)
    return out


Query = Callable[[str, dict[str, Any]], Any]


def _read(settings: Settings, sink: str, scalar: Query, since: Any) -> SinkStats:
    """A sink's figures through `scalar` (one value of one SQL statement on its database)."""
    found = SinkStats(sink)
    found.schema_version = scalar("SELECT max(version) FROM sluice_migrations", {})
    recent = 0
    for table, streams in _tables(settings, sink).items():
        found.tables[table] = int(scalar(f"SELECT count(*) FROM {quote(table)}", {}) or 0)
        for stream in streams:
            # One stream at a time: served by the (stream, committed_at) index.
            recent += int(
                scalar(
                    "SELECT coalesce(sum(inserted), 0) FROM ingestion_runs"
                    " WHERE stream = :stream AND committed_at >= :since AND sink = :sink",
                    {"stream": stream, "since": since, "sink": sink},
                )
                or 0
            )
    found.records_last_hour = recent
    return found


def postgres_stats(settings: Settings, engine: Engine, now: datetime) -> SinkStats:
    with engine.connect() as conn:

        def scalar(sql: str, params: dict[str, Any]) -> Any:
            return conn.execute(text(sql), params).scalar()

        return _read(settings, "postgres", scalar, now - WINDOW)


def sqlite_stats(settings: Settings, now: datetime) -> SinkStats:
    conn = sqlite_reader(settings.sqlite_path)
    try:

        def scalar(sql: str, params: dict[str, Any]) -> Any:
            row = conn.execute(sql, params).fetchone()
            return row[0] if row else None

        since = (now - WINDOW).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return _read(settings, "sqlite", scalar, since)
    finally:
        conn.close()


def collect_stats(settings: Settings, engine: Engine | None) -> Stats:
    """Every local sink the configured streams write to. `engine`: PostgreSQL (None when the
    deployment has none)."""
    now = datetime.now(UTC)
    stats = Stats(now)
    fed = settings.sinks_fed
    if "postgres" in fed and engine is not None:
        try:
            stats.sinks["postgres"] = postgres_stats(settings, engine, now)
        except Exception as exc:
            stats.errors["postgres"] = f"{type(exc).__name__}: {exc}".strip()
    if "sqlite" in fed:
        try:
            stats.sinks["sqlite"] = sqlite_stats(settings, now)
        except (sqlite3.Error, OSError) as exc:
            stats.errors["sqlite"] = f"{type(exc).__name__}: {exc}".strip()
    return stats

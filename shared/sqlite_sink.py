"""SQLite sink (a D1-compatible file): one executemany in one BEGIN IMMEDIATE transaction.

Its SQL (insert_sql, RUN_INSERT) is shared with the remote D1 sink, shared/d1_sink.py.

BEGIN IMMEDIATE takes the write lock up front, so two writers never deadlock on a lock upgrade;
the busy timeout makes the second one wait, and if the wait runs out the page is retried
(TransientSinkError), never dropped. `ON CONFLICT DO NOTHING` (not INSERT OR IGNORE) skips only
key conflicts: NOT NULL and CHECK violations still fail, so bad data is never silently dropped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.database import sqlite_connect
from shared.errors import (
    ForeignKeyViolationError,
    RejectedBySinkError,
    SinkError,
    TransientSinkError,
)
from shared.sink import PageMeta, WriteResult, conflict_clause, quote
from shared.streams import Stream

# The page's row in ingestion_runs, written in the page's transaction (counts filled in last).
RUN_INSERT = (
    "INSERT INTO ingestion_runs (page_id, sink, stream, source, run_id, received,"
    " inserted, duplicates, invalid, attempts, started_at)"
    " VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?)"
)
# The end of the write, so committed_at - started_at is the page latency.
COMMITTED_AT = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


def run_params(sink: str, stream: Stream, meta: PageMeta) -> tuple[Any, ...]:
    return (
        meta.page_id,
        sink,
        stream.name,
        meta.source,
        meta.run_id,
        meta.received,
        meta.invalid,
        meta.attempts,
        meta.started_at.isoformat(),
    )


def values_group(stream: Stream) -> str:
    """One row's placeholders: `(?, ?, …)`."""
    return "(" + ", ".join("?" for _ in stream.column_names) + ")"


def insert_sql(stream: Stream, rows: int = 1) -> str:
    """`INSERT … VALUES (…)[, (…)…] ON CONFLICT …` for `rows` rows, in SQLite (D1) dialect.

    The remote D1 sink (shared/d1_sink.py) sends the multi-row form, sized to D1's limits."""
    cols = ", ".join(quote(c) for c in stream.column_names)
    groups = ", ".join([values_group(stream)] * rows)
    return f"INSERT INTO {quote(stream.table)} ({cols}) VALUES {groups} " + conflict_clause(stream)


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int = 30_000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._sql: dict[tuple[str, str], str] = {}

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite_connect(self.path, self._busy_timeout_ms)
        return self._conn

    def _insert(self, stream: Stream) -> str:
        cached = self._sql.get((stream.name, stream.conflict))
        if cached:
            return cached
        sql = insert_sql(stream)
        self._sql[(stream.name, stream.conflict)] = sql
        return sql

    def write(self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        sql = self._insert(stream)
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    RUN_INSERT + " ON CONFLICT DO NOTHING", run_params(self.name, stream, meta)
                )
                first_delivery = cur.rowcount == 1
                before = conn.total_changes
                # The row commits with the page's records: finding it means a redelivery of a
                # page that is already in, so there is nothing more to write.
                if first_delivery and rows:
                    conn.executemany(sql, rows)
                inserted = conn.total_changes - before
                duplicates = meta.received - meta.invalid - inserted if first_delivery else 0
                if first_delivery:
                    conn.execute(
                        "UPDATE ingestion_runs SET inserted = ?, duplicates = ?,"
                        f" committed_at = {COMMITTED_AT} WHERE page_id = ? AND sink = ?",
                        (inserted, duplicates, meta.page_id, self.name),
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise classify(exc, stream.name) from exc
        return WriteResult(inserted, duplicates, already_committed=not first_delivery)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def classify(exc: sqlite3.Error, stream: str) -> SinkError:
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and (
        "locked" in message or "busy" in message or "disk I/O" in message
    ):
        return TransientSinkError(message, sink="sqlite", stream=stream)
    if isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in message:
        return ForeignKeyViolationError(message, sink="sqlite", stream=stream)
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
        return RejectedBySinkError(message, sink="sqlite", stream=stream)
    return SinkError(message, sink="sqlite", stream=stream)

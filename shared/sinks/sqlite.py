"""SQLite sink (a D1-compatible file): multi-row INSERTs in BEGIN IMMEDIATE transactions.

Its SQL (insert_sql, RUN_INSERT) is shared with the remote D1 sink, shared/sinks/d1.py.

BEGIN IMMEDIATE takes the write lock up front, so two writers never deadlock on a lock upgrade;
the busy timeout makes the second one wait, and if the wait runs out the page is retried
(TransientSinkError), never dropped. The conflict clause names the stream's key only (not INSERT
OR IGNORE): NOT NULL, CHECK and other UNIQUE violations still fail, so bad data is never silently
dropped.

Group commit: pages written at the same time by threads of one process (the SQLite writer runs
a threads pool) share one transaction, each inside its own SAVEPOINT. With random keys a
transaction dirties index pages all over the file and the WAL takes whole pages at each commit;
the more rows share a commit, the more of them land on pages already dirty, so a transaction of
several pages costs less per row than one per page (ops/performance.md). A page whose
statements fail is rolled back to its savepoint alone and gets its own error; the others commit.
No page is reported written before the COMMIT that holds it succeeds. While one thread commits
(sqlite3 releases the GIL inside SQLite), the others decode and validate the next pages.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from sluice.shared.database import is_busy, quote, sqlite_connect
from sluice.shared.errors import (
    ForeignKeyViolationError,
    RejectedBySinkError,
    SinkError,
    TransientSinkError,
)
from sluice.shared.sinks import (
    ORDER_COLUMN,
    PageMeta,
    WriteResult,
    conflict_clause,
    equal_rows_sql,
    page_counts,
    with_orders,
)
from sluice.shared.streams import Stream

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
        # The same text form as committed_at, so the two compare and subtract alike.
        meta.started_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
    )


def values_group(stream: Stream) -> str:
    """One row's placeholders: `(?, ?, …)`, the stream's columns and the source order."""
    return "(" + ", ".join("?" for _ in range(len(stream.column_names) + 1)) + ")"


def insert_sql(stream: Stream, rows: int = 1) -> str:
    """`INSERT … VALUES (…)[, (…)…] ON CONFLICT …` for `rows` rows, in SQLite (D1) dialect.

    The remote D1 sink (shared/sinks/d1.py) sends the multi-row form, sized to D1's limits."""
    cols = ", ".join(quote(c) for c in (*stream.column_names, ORDER_COLUMN))
    groups = ", ".join([values_group(stream)] * rows)
    return f"INSERT INTO {quote(stream.table)} ({cols}) VALUES {groups} " + conflict_clause(stream)


def delete_sql(stream: Stream) -> str:
    """Delete one key's row unless a later read of the key wrote it (SQLite/D1 dialect); the
    parameters are the key's values, then its source order twice."""
    o = quote(ORDER_COLUMN)
    match = " AND ".join(f"{quote(k)} = ?" for k in stream.key)
    return (
        f"DELETE FROM {quote(stream.table)} WHERE {match} AND ({o} IS NULL OR ? IS NULL OR {o} < ?)"
    )


RUN_FINISH = (
    "UPDATE ingestion_runs SET inserted = ?, duplicates = ?, updated = ?, unchanged = ?,"
    f" deleted = ?, committed_at = {COMMITTED_AT} WHERE page_id = ? AND sink = ?"
)


def finish_params(sink: str, meta: PageMeta, r: WriteResult) -> tuple[Any, ...]:
    return (r.inserted, r.duplicates, r.updated, r.unchanged, r.deleted, meta.page_id, sink)


# Threads of the SQLite writer (`sluice worker --queues ingest.sqlite --pool threads
# --concurrency 16`): while one group commits, the others' pages form the next, so a group holds
# about half of them, and rows per transaction are what make random-key inserts cheap. Each
# thread holds one decoded page (a threads-pool worker prefetches no more), so the writer's
# memory is its threads' pages plus the SQLite cache (`sqlite_cache_mib`).
WRITER_THREADS = 16
# Rows per INSERT statement (within SQLite's bound-variable limit).
STATEMENT_ROWS = 1000
# A prepared multi-row statement holds memory in SQLite for every row it binds, and sqlite3
# keeps the last 128 statements prepared: one statement per page size seen (pages shrink by
# their duplicates, so sizes vary) kept the writer growing. A page's remainder below
# STATEMENT_ROWS goes in as a multiple of SHAPE_STEP rows plus fewer than SHAPE_STEP: at most
# 1 + 15 + 63 shapes, at the price of one extra statement per page.
SHAPE_STEP = 64
# At most this many pages share a transaction: bounds the rows one failed COMMIT sends back.
MAX_GROUP_PAGES = 16


def statement_sizes(rows: int, per: int) -> list[int]:
    """Rows per INSERT for a page of `rows`: full statements of `per`, then the rest as a
    multiple of SHAPE_STEP and a remainder, so few distinct statements are ever prepared."""
    full, rest = divmod(rows, per)
    sizes = [per] * full + [rest - rest % SHAPE_STEP, rest % SHAPE_STEP]
    return [n for n in sizes if n]


@dataclass
class _Write:
    """One page waiting for (or done with) its group's transaction."""

    stream: Stream
    rows: Sequence[Sequence[Any]]
    meta: PageMeta
    delete: bool = False  # rows are keys (with their source order) to remove
    result: WriteResult | None = None
    error: BaseException | None = None
    done: bool = False


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int = 30_000, cache_mib: int = 64) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._cache_mib = cache_mib
        self._conn: sqlite3.Connection | None = None
        self._sql: dict[tuple[str, str, int], str] = {}
        self._group = threading.Condition()
        self._waiting: list[_Write] = []
        self._committing = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite_connect(self.path, self._busy_timeout_ms, self._cache_mib)
        return self._conn

    def _insert_rows(
        self, conn: sqlite3.Connection, stream: Stream, rows: Sequence[Sequence[Any]]
    ) -> None:
        """Multi-row INSERTs of up to STATEMENT_ROWS rows. executemany would release and retake
        the GIL for every row, and with other threads of the writer busy each retake can wait
        for the interpreter's switch interval (5 ms); one statement per chunk hands the GIL over
        once while SQLite works, so the other threads validate the next pages meanwhile."""
        width = len(stream.column_names) + 1
        per = max(
            1, min(STATEMENT_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)
        )
        i = 0
        for size in statement_sizes(len(rows), per):
            chunk = rows[i : i + size]
            conn.execute(self._insert(stream, size), list(itertools.chain.from_iterable(chunk)))
            i += size

    def _equal_rows(
        self, conn: sqlite3.Connection, stream: Stream, rows: Sequence[Sequence[Any]]
    ) -> tuple[int, int]:
        """Rows of the page equal to what the table holds, and how many of those will still be
        written (shared/sinks/__init__.py equal_rows_sql), counted before the page's INSERTs."""
        names = [*stream.column_names, ORDER_COLUMN]
        width = len(names)
        per = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)
        match = " AND ".join(f"t.{quote(k)} = v.{quote(k)}" for k in stream.key)
        count = equal_rows_sql(stream, "t", "v", "sqlite").format(
            source=f"FROM v JOIN {quote(stream.table)} t ON {match}"
        )
        equal = written = 0
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            cte = f"WITH v({', '.join(quote(n) for n in names)}) AS (VALUES " + ", ".join(
                [values_group(stream)] * len(chunk)
            )
            found = conn.execute(
                cte + ") " + count, list(itertools.chain.from_iterable(chunk))
            ).fetchone()
            equal += found[0]
            written += found[1]
        return equal, written

    def _insert(self, stream: Stream, rows: int) -> str:
        key = (stream.name, stream.conflict, rows)
        sql = self._sql.get(key)
        if sql is None:
            sql = self._sql[key] = insert_sql(stream, rows)
        return sql

    def write(self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        """Write the page in the next group transaction; return once that has committed.

        The first waiting thread commits everything queued by then (up to MAX_GROUP_PAGES pages),
        its own page among them; the others wait for it, and one of them leads the next group."""
        return self._queue(_Write(stream, with_orders(stream, rows), meta))

    def delete(self, stream: Stream, keys: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        return self._queue(_Write(stream, keys, meta, delete=True))

    def _queue(self, mine: _Write) -> WriteResult:
        with self._group:
            self._waiting.append(mine)
            while not mine.done:
                if self._committing:
                    self._group.wait()
                    continue
                self._committing = True
                group = self._waiting[:MAX_GROUP_PAGES]
                del self._waiting[:MAX_GROUP_PAGES]
                self._group.release()
                try:
                    self._commit(group)
                finally:
                    self._group.acquire()
                    self._committing = False
                    self._group.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _commit(self, group: list[_Write]) -> None:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            for w in group:
                conn.execute("SAVEPOINT page")
                try:
                    w.result = self._write_page(conn, w)
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back (I/O error, full disk)
                    conn.execute("ROLLBACK TO page")
                    if isinstance(exc, sqlite3.Error):
                        w.error = classify(exc, w.stream.name)
                    else:
                        w.error = exc
                conn.execute("RELEASE page")
            conn.execute("COMMIT")
        except BaseException as exc:
            self._abort(group, exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: the waiters are told, the leader stops
        finally:
            for w in group:
                w.done = True

    def _abort(self, group: list[_Write], exc: BaseException) -> None:
        """Nothing of the group committed: every page fails on its own and is retried."""
        if self._conn is not None and self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        for w in group:
            w.result = None
            if w.error is not None:
                continue  # its own failure says more
            if isinstance(exc, sqlite3.Error):
                w.error = classify(exc, w.stream.name)
            else:
                w.error = TransientSinkError(
                    f"the transaction shared with other pages failed: {exc!r}",
                    sink=self.name,
                    stream=w.stream.name,
                )

    def _write_page(self, conn: sqlite3.Connection, w: _Write) -> WriteResult:
        stream, meta = w.stream, w.meta
        cur = conn.execute(
            RUN_INSERT + " ON CONFLICT DO NOTHING", run_params(self.name, stream, meta)
        )
        # The row commits with the page's records: finding it means a redelivery of a page
        # that is already in, so there is nothing more to write.
        if cur.rowcount != 1:
            return WriteResult(0, 0, already_committed=True)
        if w.delete:
            sql = delete_sql(stream)
            deleted = 0
            for k in w.rows:
                *key, order = k
                deleted += conn.execute(sql, [*key, order, order]).rowcount
            result = WriteResult(0, len(w.rows) - deleted, deleted=deleted)
        else:
            equal = equal_written = 0
            if stream.conflict != "ignore":
                equal, equal_written = self._equal_rows(conn, stream, w.rows)
            # New rows take rowids above the table's highest, updates keep theirs: counting the
            # rows above it afterwards tells inserted from updated (changes counts both).
            table = quote(stream.table)
            top = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0
            before = conn.total_changes
            self._insert_rows(conn, stream, w.rows)
            written = conn.total_changes - before
            inserted = conn.execute(
                f"SELECT count(*) FROM {table} WHERE rowid > ?", (top,)
            ).fetchone()[0]
            result = page_counts(stream, meta, written, inserted, equal, equal_written)
        conn.execute(RUN_FINISH, finish_params(self.name, meta, result))
        return result

    def close(self) -> None:
        with self._group:
            while self._committing:
                self._group.wait()
            if self._conn is not None:
                self._conn.close()
            self._conn = None


def classify(exc: sqlite3.Error, stream: str) -> SinkError:
    message = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and (is_busy(exc) or "disk I/O" in message):
        return TransientSinkError(message, sink="sqlite", stream=stream)
    if isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in message:
        return ForeignKeyViolationError(message, sink="sqlite", stream=stream)
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
        return RejectedBySinkError(message, sink="sqlite", stream=stream)
    return SinkError(message, sink="sqlite", stream=stream)

"""PostgreSQL sink: COPY the page into a temporary staging table, then one
INSERT … SELECT … ON CONFLICT into the target (COPY is the fastest way in; the conflict clause
runs on the server, once for the page).

The conflict clause names the stream's key only (sinks.conflict_clause): a row whose other unique
column (`usage_events.id`) already exists with another key fails the page with a unique violation
naming the constraint, and the consumer isolates that record as a dead letter. Any error rolls
the connection back before it is used again.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions

from sluice.shared.database import libpq_dsn, quote
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

# SQLSTATE classes and codes worth retrying: the same page can succeed once they pass.
_TRANSIENT_CLASSES = ("08", "53", "57", "40")  # connection, resources, operator, rollback
_REJECT_CLASSES = ("22", "23")  # data exception, integrity constraint


class _Null(float):
    """Written by the csv module as an unquoted empty field: COPY's NULL in CSV format.

    QUOTE_NONNUMERIC quotes every string (so '' stays an empty string) and leaves numbers bare;
    this number's repr is empty, which is how a NULL reads in CSV. The csv writer is written in
    C, so it is the fallback for pages whose values need escaping, far cheaper than escaping
    each value in Python."""

    def __repr__(self) -> str:
        return ""


_NULL = _Null(0.0)

# Column types of the streams as PostgreSQL holds them (schema/postgres).
PG_TYPES = {
    "text": "text",
    "int": "bigint",
    "float": "double precision",
    "decimal": "numeric",
    "timestamp": "timestamptz",
    "json": "jsonb",
}


def copy_csv(rows: Sequence[Sequence[Any]]) -> bytes:
    """Rows in COPY's CSV format (the caller's rows are not modified)."""
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerows(
        r if None not in r else [_NULL if v is None else v for v in r] for r in rows
    )
    return buf.getvalue().encode()


def copy_text(rows: Sequence[Sequence[Any]]) -> bytes | None:
    """Rows in COPY's text format, or None when a value would need escaping (then use copy_csv).

    Built column by column (a column of strings is used as it is, others go through str once)
    and joined with C-level passes, cheaper still than the csv writer. Text format needs a
    backslash, tab, newline or carriage return inside a value escaped; rather than scanning every
    value, the page is checked as a whole: if it holds exactly the tabs and newlines the joins
    put in, and no backslash besides the NULL markers, no value contains one."""
    if not rows:
        return b""
    width = len(rows[0])
    columns: list[Sequence[str]] = []
    nulls = 0
    for column in zip(*rows, strict=True):
        types = set(map(type, column))
        if types == {str}:
            columns.append(column)
        elif type(None) in types:
            nulls += column.count(None)
            columns.append(["\\N" if v is None else str(v) for v in column])
        else:
            columns.append(list(map(str, column)))
    body = "\n".join(map("\t".join, zip(*columns, strict=True))) + "\n"
    if (
        body.count("\t") != len(rows) * (width - 1)
        or body.count("\n") != len(rows)
        or body.count("\\") != nulls
        or "\r" in body
    ):
        return None
    return body.encode()


class PostgresSink:
    name = "postgres"

    def __init__(self, url: str) -> None:
        self._dsn = libpq_dsn(url)
        self._conn: psycopg2.extensions.connection | None = None
        self._sql: dict[tuple[str, str], tuple[str, str, str, str, str | None]] = {}
        # Staging tables known to exist in this session (CREATE … IF NOT EXISTS per page sent a
        # NOTICE and a catalog lookup every time); emptied with each new connection.
        self._staged: set[str] = set()

    def _connection(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._staged.clear()
            try:
                self._conn = psycopg2.connect(
                    self._dsn, connect_timeout=10, application_name="sluice-postgres-sink"
                )
            except psycopg2.OperationalError as exc:
                raise TransientSinkError(f"cannot connect: {exc}".strip(), sink=self.name) from exc
        return self._conn

    def _statements(self, stream: Stream) -> tuple[str, str, str, str, str | None]:
        cached = self._sql.get((stream.name, stream.conflict))
        if cached:
            return cached
        table = quote(stream.table)
        stage = quote(f"sluice_stage_{stream.table}")
        cols = ", ".join(quote(c) for c in (*stream.column_names, ORDER_COLUMN))
        key = ", ".join(quote(k) for k in stream.key)
        create = (
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        copy = f"COPY {stage} ({cols}) FROM STDIN"
        copy_csv = f"COPY {stage} ({cols}) FROM STDIN WITH (FORMAT csv)"
        # One round trip: the rows go in, and the server counts which were new (xmax = 0: no
        # earlier version of the row) and which replaced another.
        insert = (
            f"WITH w AS (INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} ORDER BY {key} "
            + conflict_clause(stream)
            + " RETURNING (xmax = 0) AS new)"
            " SELECT count(*), count(*) FILTER (WHERE new) FROM w"
        )
        # Under update/newer: the page's rows equal to what the table holds, read first.
        match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in stream.key)
        equal = (
            None
            if stream.conflict == "ignore"
            else equal_rows_sql(stream, "t", "s", "postgresql").format(
                source=f"FROM {stage} s JOIN {table} t ON {match}"
            )
        )
        statements = (create, copy, copy_csv, insert, equal)
        self._sql[(stream.name, stream.conflict)] = statements
        return statements

    def _begin_run(self, cur: Any, stream: Stream, meta: PageMeta) -> bool:
        """Insert the page's ingestion_runs row; False when it is there already (a redelivery of
        a committed page: the row commits with the page's records)."""
        cur.execute(
            "INSERT INTO ingestion_runs (page_id, sink, stream, source, run_id, received,"
            " inserted, duplicates, invalid, attempts, started_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, 0, 0, %s, %s, %s)"
            " ON CONFLICT (page_id, sink) DO NOTHING",
            (
                meta.page_id,
                self.name,
                stream.name,
                meta.source,
                meta.run_id,
                meta.received,
                meta.invalid,
                meta.attempts,
                meta.started_at,
            ),
        )
        return bool(cur.rowcount == 1)

    def _finish_run(self, cur: Any, meta: PageMeta, r: WriteResult) -> None:
        cur.execute(
            # clock_timestamp(): the end of the write (now() is the transaction start), so
            # committed_at - started_at is the page's latency.
            "UPDATE ingestion_runs SET inserted = %s, duplicates = %s, updated = %s,"
            " unchanged = %s, deleted = %s, committed_at = clock_timestamp()"
            " WHERE page_id = %s AND sink = %s",
            (r.inserted, r.duplicates, r.updated, r.unchanged, r.deleted, meta.page_id, self.name),
        )

    def write(self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        rows = with_orders(stream, rows)
        create, copy, copy_as_csv, insert, equal_sql = self._statements(stream)
        conn = self._connection()
        created = False
        try:
            with conn.cursor() as cur:
                if not self._begin_run(cur, stream, meta):
                    conn.commit()
                    return WriteResult(0, 0, already_committed=True)
                written = inserted = equal = equal_written = 0
                if rows:
                    if stream.table not in self._staged:
                        cur.execute(create)
                        created = True
                    data = copy_text(rows)
                    if data is not None:
                        cur.copy_expert(copy, io.BytesIO(data))
                    else:
                        cur.copy_expert(copy_as_csv, io.BytesIO(copy_csv(rows)))
                    if equal_sql is not None:
                        cur.execute(equal_sql)
                        equal, equal_written = cur.fetchone()
                    cur.execute(insert)
                    written, inserted = cur.fetchone()
                result = page_counts(stream, meta, written, inserted, equal, equal_written)
                self._finish_run(cur, meta, result)
            conn.commit()
        except psycopg2.Error as exc:
            self._reset(conn)
            raise classify(exc, stream.name) from exc
        if created:  # committed, so the table outlives this transaction
            self._staged.add(stream.table)
        return result

    def delete(self, stream: Stream, keys: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        from psycopg2.extras import execute_values

        names = [*stream.key, ORDER_COLUMN]
        types = [*(PG_TYPES[stream.column(k).type] for k in stream.key), "bigint"]
        values = ", ".join(f"d.{quote(n)}::{t}" for n, t in zip(names, types, strict=True))
        table, o = quote(stream.table), quote(ORDER_COLUMN)
        match = " AND ".join(f"t.{quote(k)} = v.{quote(k)}" for k in stream.key)
        sql = (
            f"DELETE FROM {table} t USING (SELECT {values} FROM (VALUES %s) AS d"
            f" ({', '.join(quote(n) for n in names)})) v WHERE {match}"
            f" AND (t.{o} IS NULL OR v.{o} IS NULL OR t.{o} < v.{o})"
        )
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                if not self._begin_run(cur, stream, meta):
                    conn.commit()
                    return WriteResult(0, 0, already_committed=True)
                deleted = 0
                if keys:
                    execute_values(cur, sql, [list(k) for k in keys], page_size=len(keys))
                    deleted = cur.rowcount
                result = WriteResult(0, len(keys) - deleted, deleted=deleted)
                self._finish_run(cur, meta, result)
            conn.commit()
        except psycopg2.Error as exc:
            self._reset(conn)
            raise classify(exc, stream.name) from exc
        return result

    def _reset(self, conn: psycopg2.extensions.connection) -> None:
        try:
            if not conn.closed:
                conn.rollback()
        except psycopg2.Error:
            conn.close()

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None


def classify(exc: psycopg2.Error, stream: str) -> SinkError:
    code = exc.pgcode or ""
    message = (exc.pgerror or str(exc)).strip().splitlines()[0] if (exc.pgerror or str(exc)) else ""
    if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError) and not code:
        return TransientSinkError(f"connection lost: {message}", sink="postgres", stream=stream)
    if code[:2] in _TRANSIENT_CLASSES:
        return TransientSinkError(message, sink="postgres", stream=stream, sqlstate=code)
    if code == psycopg2.errorcodes.FOREIGN_KEY_VIOLATION:
        return ForeignKeyViolationError(message, sink="postgres", stream=stream, sqlstate=code)
    if code[:2] in _REJECT_CLASSES:
        return RejectedBySinkError(message, sink="postgres", stream=stream, sqlstate=code)
    return SinkError(message, sink="postgres", stream=stream, sqlstate=code)

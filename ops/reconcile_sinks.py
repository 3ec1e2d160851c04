"""The sinks as `sluice reconcile` reads them: read-only, in bulk.

A sink's keys come in one query per stream (a server-side cursor on PostgreSQL, keyset pages of
D1_KEY_PAGE rows on the remote D1); sampled rows in chunked IN lists, within SQLite's and D1's
limits on bound parameters; orphans (child rows whose parent is missing) by one count and one
listing per foreign key.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions

from sluice.shared.cloudflare import MAX_BOUND_PARAMS
from sluice.shared.database import libpq_dsn, postgres_url, quote
from sluice.shared.errors import ConfigError, D1Error, SinkError
from sluice.shared.settings import D1SinkConfig, Settings
from sluice.shared.sinks.d1 import d1_client
from sluice.shared.streams import ForeignKey, Stream

Key = tuple[Any, ...]

PG_KEYS_PER_QUERY = 1000
SQLITE_KEYS_PER_QUERY = 400  # SQLite builds before 3.32 allow 999 bound parameters
D1_KEY_PAGE = 10_000  # rows per keyset page when listing a remote D1 table's keys


class SinkReader(Protocol):
    """One sink, opened read-only."""

    name: str

    def keys(self, stream: Stream) -> Iterator[Key]:
        """Every key of the stream's table, as the database returns it."""
        ...

    def rows(self, stream: Stream, keys: Sequence[Key]) -> Iterator[Sequence[Any]]:
        """The rows of these keys (those the table holds), in the stream's column order."""
        ...

    def orphans(self, stream: Stream, fk: ForeignKey, limit: int) -> tuple[int, list[Key]]:
        """How many rows have no parent row through `fk`, and the keys of the first `limit`."""
        ...

    def close(self) -> None: ...


def _key_cols(stream: Stream, alias: str = "") -> str:
    return ", ".join(alias + quote(k) for k in stream.key)


def _orphan_sql(stream: Stream, fk: ForeignKey) -> tuple[str, str]:
    """(count, listing) of child rows whose parent row is missing; the listing ends in LIMIT."""
    where = (
        f"FROM {quote(stream.table)} c WHERE c.{quote(fk.column)} IS NOT NULL AND NOT EXISTS"
        f" (SELECT 1 FROM {quote(fk.parent_table)} p"
        f" WHERE p.{quote(fk.parent_column)} = c.{quote(fk.column)})"
    )
    return (
        f"SELECT count(*) AS n {where}",
        f"SELECT {_key_cols(stream, 'c.')} {where} ORDER BY {_key_cols(stream, 'c.')} LIMIT ",
    )


class _SqlReader:
    """What the PostgreSQL and SQLite readers share: a connection and a `_run` of SQL."""

    name: str
    conn: Any

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def orphans(self, stream: Stream, fk: ForeignKey, limit: int) -> tuple[int, list[Key]]:
        count, listing = _orphan_sql(stream, fk)
        total = int(self._run(count)[0][0])
        found = self._run(listing + str(int(limit))) if total else []
        return total, [tuple(r) for r in found]

    def close(self) -> None:
        self.conn.close()


class PostgresReader(_SqlReader):
    name = "postgres"

    def __init__(self, url: str) -> None:
        try:
            self.conn: psycopg2.extensions.connection = psycopg2.connect(
                libpq_dsn(url), connect_timeout=10, application_name="sluice-reconcile"
            )
        except psycopg2.OperationalError as exc:
            raise SinkError(f"cannot connect: {exc}".strip(), sink=self.name) from exc
        self.conn.set_session(readonly=True)

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, tuple(params))
                return list(cur.fetchall())
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise SinkError(str(exc).strip(), sink=self.name) from exc

    def keys(self, stream: Stream) -> Iterator[Key]:
        # A named (server-side) cursor: one query, fetched 10,000 rows at a time.
        try:
            with self.conn.cursor(name=f"reconcile_{stream.name}") as cur:
                cur.itersize = 10_000
                cur.execute(f"SELECT {_key_cols(stream)} FROM {quote(stream.table)}")
                for row in cur:
                    yield tuple(row)
            self.conn.rollback()  # end the read transaction the named cursor needed
        except psycopg2.Error as exc:
            self.conn.rollback()
            raise SinkError(str(exc).strip(), sink=self.name, stream=stream.name) from exc

    def rows(self, stream: Stream, keys: Sequence[Key]) -> Iterator[Sequence[Any]]:
        cols = ", ".join(quote(c) for c in stream.column_names)
        group = "(" + ", ".join(["%s"] * len(stream.key)) + ")"
        for i in range(0, len(keys), PG_KEYS_PER_QUERY):
            part = keys[i : i + PG_KEYS_PER_QUERY]
            # A row-value IN list of literals: PostgreSQL coerces each to its column's type.
            sql = (
                f"SELECT {cols} FROM {quote(stream.table)} WHERE ({_key_cols(stream)}) IN"
                f" ({', '.join([group] * len(part))})"
            )
            yield from self._run(sql, [v for k in part for v in k])


class SqliteReader(_SqlReader):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise SinkError(f"SQLite file not found: {path}", sink=self.name)
        # Read-only: reconciling never changes a sink.
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def _run(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self.conn.execute(sql, tuple(params)).fetchall())
        except sqlite3.Error as exc:
            raise SinkError(str(exc), sink=self.name) from exc

    def keys(self, stream: Stream) -> Iterator[Key]:
        try:
            cur = self.conn.execute(f"SELECT {_key_cols(stream)} FROM {quote(stream.table)}")
            while batch := cur.fetchmany(10_000):
                yield from (tuple(r) for r in batch)
        except sqlite3.Error as exc:
            raise SinkError(str(exc), sink=self.name, stream=stream.name) from exc

    def rows(self, stream: Stream, keys: Sequence[Key]) -> Iterator[Sequence[Any]]:
        for sql, params in _in_list_queries(stream, keys, SQLITE_KEYS_PER_QUERY):
            yield from self._run(sql, params)


def _in_list_queries(
    stream: Stream, keys: Sequence[Key], per_query: int
) -> Iterator[tuple[str, list[Any]]]:
    """SELECT the stream's columns for `keys`, `per_query` keys a statement (SQLite dialect)."""
    cols = ", ".join(quote(c) for c in stream.column_names)
    if len(stream.key) == 1:
        target, mark = quote(stream.key[0]), "?"
    else:
        target = "(" + _key_cols(stream) + ")"
        mark = "(" + ", ".join("?" for _ in stream.key) + ")"
    for i in range(0, len(keys), per_query):
        part = keys[i : i + per_query]
        marks = ", ".join([mark] * len(part))
        where = (
            f"{target} IN ({marks})" if len(stream.key) == 1 else f"{target} IN (VALUES {marks})"
        )
        yield (
            f"SELECT {cols} FROM {quote(stream.table)} WHERE {where}",
            [v for k in part for v in k],
        )


class D1Reader:
    """The remote D1 sink, read through shared/cloudflare.py's client (retries, envelope)."""

    name = "d1"

    def __init__(self, cfg: D1SinkConfig, token: str) -> None:
        self.client = d1_client(cfg, token)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            return self.client.query(sql, list(params))
        except D1Error as exc:
            raise SinkError(exc.message, sink=self.name, status=exc.status, code=exc.code) from exc

    def keys(self, stream: Stream) -> Iterator[Key]:
        # Keyset pages on rowid (every sink table has one): two bound parameters a request, and
        # no page depends on an OFFSET scan.
        cols = _key_cols(stream)
        after = -1
        while True:
            found = self._query(
                f"SELECT rowid AS sluice_rowid, {cols} FROM {quote(stream.table)}"
                " WHERE rowid > ? ORDER BY rowid LIMIT ?",
                [after, D1_KEY_PAGE],
            )
            for r in found:
                yield tuple(r[k] for k in stream.key)
            if len(found) < D1_KEY_PAGE:
                return
            after = int(found[-1]["sluice_rowid"])

    def rows(self, stream: Stream, keys: Sequence[Key]) -> Iterator[Sequence[Any]]:
        per = max(1, MAX_BOUND_PARAMS // len(stream.key))
        names = stream.column_names
        for sql, params in _in_list_queries(stream, keys, per):
            for r in self._query(sql, params):
                yield [r.get(c) for c in names]

    def orphans(self, stream: Stream, fk: ForeignKey, limit: int) -> tuple[int, list[Key]]:
        count, listing = _orphan_sql(stream, fk)
        total = int(self._query(count)[0]["n"])
        found = self._query(listing + str(int(limit))) if total else []
        return total, [tuple(r[k] for k in stream.key) for r in found]

    def close(self) -> None:
        self.client.close()


def open_readers(settings: Settings, sinks: Sequence[str]) -> dict[str, SinkReader]:
    """A reader for each of `sinks`; a sink that cannot be opened closes the others."""
    readers: dict[str, SinkReader] = {}
    try:
        for sink in sinks:
            if sink == "postgres":
                readers[sink] = PostgresReader(postgres_url(settings))
            elif sink == "sqlite":
                readers[sink] = SqliteReader(settings.sqlite_path)
            elif sink == "d1":
                cfg = settings.d1_sink
                if cfg is None:
                    raise ConfigError(["sinks.d1: a stream writes to 'd1' but it is not set"])
                token = settings.secret(cfg.api_token_env)
                if not token:
                    raise ConfigError([f"sinks.d1: no API token in ${cfg.api_token_env}"])
                readers[sink] = D1Reader(cfg, token)
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    return readers

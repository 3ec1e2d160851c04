"""Which of a batch of keys a sink holds: what `sluice prune` asks every sink of a stream before
it deletes a D1 source's rows.

Each sink answers with the positions of the keys it holds, joined from the list of keys (a
VALUES list; on PostgreSQL arrays typed as the key columns) against the stream's table on its
key columns, so the keys are compared as the table stores them. Statements keep within each
database's bound-parameter limit (100 on D1). A sink that cannot answer within the
retention's `sink_timeout_seconds` (down, or its table locked) raises SinkUnavailableError:
the batch is then kept whole.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions

from sluice.shared.cloudflare import D1Client, iter_row_chunks
from sluice.shared.database import libpq_dsn, postgres_url, quote
from sluice.shared.errors import ConfigError, D1Error, SinkError
from sluice.shared.settings import Settings
from sluice.shared.sinks.d1 import d1_client
from sluice.shared.sinks.postgres import PG_TYPES  # a bound key array is typed as the sink holds it
from sluice.shared.streams import Stream

PG_KEYS_PER_QUERY = 1000
SQLITE_PARAMS_PER_QUERY = 400  # SQLite builds before 3.32 allow 999 bound parameters
CACHE_MIB = 64  # page cache of the SQLite sink's reader, and of a local D1 file being pruned


class SinkUnavailableError(SinkError):
    """A sink could not say which keys it holds: nothing of the batch may be deleted."""

    transient = True


class KeyCheck(Protocol):
    name: str

    def present(self, stream: Stream, keys: Sequence[Sequence[Any]]) -> set[int]:
        """Positions in `keys` (normalised key values, in the stream's key order) of the keys
        the stream's table holds."""
        ...

    def close(self) -> None: ...


def _join_sql(stream: Stream, first: int, count: int, values: Sequence[str]) -> str:
    """SELECT the positions of a VALUES list of `count` keys (numbered from `first`) that the
    table holds; `values`: each key column's bound value (`?`, or a cast around `%s`)."""
    names = [f"k{j}" for j in range(len(stream.key))]
    one = ", ".join(values)
    rows = ", ".join(f"({first + i}, {one})" for i in range(count))
    on = " AND ".join(f"t.{quote(k)} = v.{n}" for k, n in zip(stream.key, names, strict=True))
    return (
        f"WITH v(i, {', '.join(names)}) AS (VALUES {rows})"
        f" SELECT v.i FROM v JOIN {quote(stream.table)} t ON {on}"
    )


class PostgresKeys:
    name = "postgres"

    def __init__(self, url: str, timeout: float) -> None:
        ms = max(1, int(timeout * 1000))
        try:
            self._conn = psycopg2.connect(
                libpq_dsn(url),
                connect_timeout=max(1, int(timeout)),
                options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
            )
        except psycopg2.Error as exc:
            raise SinkUnavailableError(_first_line(exc), sink=self.name) from exc
        self._conn.autocommit = True

    def present(self, stream: Stream, keys: Sequence[Sequence[Any]]) -> set[int]:
        # One array per key column, typed as the column, unnested side by side: one short
        # statement however many keys (a VALUES list of a thousand rows costs more to plan).
        names = [f"k{j}" for j in range(len(stream.key))]
        arrays = ", ".join(f"%s::{PG_TYPES[stream.column(k).type]}[]" for k in stream.key)
        on = " AND ".join(f"t.{quote(k)} = v.{n}" for k, n in zip(stream.key, names, strict=True))
        sql = (
            f"SELECT v.i FROM unnest({arrays}) WITH ORDINALITY AS v({', '.join(names)}, i)"
            f" JOIN {quote(stream.table)} t ON {on}"
        )
        found: set[int] = set()
        for start in range(0, len(keys), PG_KEYS_PER_QUERY):
            chunk = keys[start : start + PG_KEYS_PER_QUERY]
            columns = [list(c) for c in zip(*chunk, strict=True)]
            try:
                with self._conn.cursor() as cur:
                    cur.execute(sql, columns)
                    found.update(start + int(r[0]) - 1 for r in cur.fetchall())
            except psycopg2.Error as exc:
                raise SinkUnavailableError(
                    _first_line(exc), sink=self.name, stream=stream.name
                ) from exc
        return found

    def close(self) -> None:
        self._conn.close()


class SqliteKeys:
    name = "sqlite"

    def __init__(self, path: Path, timeout: float) -> None:
        if not path.exists():
            raise SinkUnavailableError(f"SQLite sink file not found: {path}", sink=self.name)
        try:
            self._conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, timeout=timeout, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise SinkUnavailableError(str(exc), sink=self.name) from exc
        # Keys are looked up at random in the key's index: a cache that holds much of it saves
        # a read per lookup (memory for the length of the prune only).
        self._conn.execute(f"PRAGMA cache_size={-1024 * CACHE_MIB}")

    def present(self, stream: Stream, keys: Sequence[Sequence[Any]]) -> set[int]:
        found: set[int] = set()
        per = max(1, SQLITE_PARAMS_PER_QUERY // len(stream.key))
        for start in range(0, len(keys), per):
            chunk = keys[start : start + per]
            sql = _join_sql(stream, start, len(chunk), ["?"] * len(stream.key))
            try:
                rows = self._conn.execute(sql, [v for key in chunk for v in key]).fetchall()
            except sqlite3.Error as exc:
                raise SinkUnavailableError(str(exc), sink=self.name, stream=stream.name) from exc
            found.update(int(r[0]) for r in rows)
        return found

    def close(self) -> None:
        self._conn.close()


class D1Keys:
    name = "d1"

    def __init__(self, client: D1Client) -> None:
        self._client = client

    def present(self, stream: Stream, keys: Sequence[Sequence[Any]]) -> set[int]:
        found: set[int] = set()
        start = 0
        for chunk in iter_row_chunks(keys, len(stream.key)):
            sql = _join_sql(stream, start, len(chunk), ["?"] * len(stream.key))
            try:
                rows = self._client.query(sql, [v for key in chunk for v in key])
            except D1Error as exc:
                raise SinkUnavailableError(exc.message, sink=self.name, stream=stream.name) from exc
            found.update(int(r["i"]) for r in rows)
            start += len(chunk)
        return found

    def close(self) -> None:
        self._client.close()


def open_key_checks(settings: Settings, sinks: Sequence[str]) -> dict[str, KeyCheck]:
    """A checker per sink, connected; a sink that cannot be opened raises
    SinkUnavailableError (the others opened so far are closed)."""
    timeout = settings.retention.sink_timeout_seconds
    out: dict[str, KeyCheck] = {}
    try:
        for name in sinks:
            if name == "postgres":
                out[name] = PostgresKeys(postgres_url(settings), timeout)
            elif name == "sqlite":
                out[name] = SqliteKeys(settings.sqlite_path, timeout)
            elif name == "d1":
                cfg = settings.d1_sink
                if cfg is None:
                    raise ConfigError(["streams.*.sinks: 'd1' needs a [sinks.d1] table"])
                token = settings.secret(cfg.api_token_env)
                if not token:
                    raise SinkUnavailableError(
                        f"the D1 sink needs an API token in ${cfg.api_token_env}", sink=name
                    )
                out[name] = D1Keys(d1_client(cfg, token))
    except BaseException:
        for check in out.values():
            check.close()
        raise
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

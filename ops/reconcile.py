"""`sluice reconcile SOURCE`: does every sink hold what the source holds? (a migration's check)

For each stream the source feeds, and each sink that stream writes to (postgres, sqlite, and the
remote D1 when configured):

- counts: the source's distinct keys after the pipeline's own validation (shared/records.py), so a
  record the pipeline dead-letters is counted as invalid, not as missing; how many of those keys
  each sink holds; the dead letters pending for this source and stream, per sink;
- missing keys (in the source, not in a sink), split into those a pending dead letter accounts for
  and the rest; extra keys (in a sink, not in the source), only for a stream no other configured
  source feeds, since rows do not record their source;
- a seeded random sample of keys compared field by field after normalisation (timestamps, floats,
  JSON text vs jsonb, integers SQLite or D1 return as floats), skipping the columns the source
  cannot know (SKIPPED_COLUMNS);
- referential integrity in each sink: child rows whose parent row is missing (Stream.foreign_keys).

Reads are bulk: a sink's keys come in one query per stream (keyset pages of 10,000 rows on the
remote D1); sampled rows in chunked IN lists (within 100 bound parameters on D1). The source is
read once, through its read-only `snapshot()`.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

import orjson
import psycopg2
import psycopg2.extensions
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from sluice.shared.cloudflare import MAX_BOUND_PARAMS
from sluice.shared.database import libpq_dsn, postgres_url, quote
from sluice.shared.errors import ConfigError, D1Error, SinkError, SourceError
from sluice.shared.records import Validator, record_key
from sluice.shared.settings import D1SinkConfig, D1SourceConfig, KvSourceConfig, Settings
from sluice.shared.sinks.d1 import d1_client
from sluice.shared.state import open_state
from sluice.shared.streams import Column, ForeignKey, Stream

Key = tuple[Any, ...]

DEFAULT_SAMPLE = 100
DEFAULT_LIMIT = 20  # keys listed per problem; the totals are always complete
VALIDATE_BATCH = 1000
PG_KEYS_PER_QUERY = 1000
SQLITE_KEYS_PER_QUERY = 400  # SQLite builds before 3.32 allow 999 bound parameters
D1_KEY_PAGE = 10_000  # rows per keyset page when listing a remote D1 table's keys
FLOAT_REL_TOL = 1e-12  # doubles survive every sink; only D1's JSON could round the last digit

# Columns a KV snapshot fills from the clock of the call (producers/kv_mapping.py: the bot's
# KV data holds no such time), so the snapshot cannot know what the migration wrote.
KV_CLOCK_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("created_at", "updated_at"),
    "watchlists": ("created_at",),
    "active_positions": ("created_at", "updated_at"),
}
# What the report says is skipped, per stream. A cache row's times come from the clock only when
# its value has no timestamp (updated_at) and its key no KV expiration (expires_at as well).
SKIPPED_COLUMNS: dict[str, str] = {
    "users": "created_at, updated_at (time of the migration)",
    "watchlists": "created_at (time of the migration)",
    "active_positions": "created_at, updated_at (time of the migration)",
    "cache": "updated_at when the value has no timestamp of its own, and expires_at when the"
    " key has no KV expiration either (both then come from the migration's clock)",
}


# -- normalisation --------------------------------------------------------------------------------


def canon(col: Column, value: Any) -> Any:
    """One value as the pipeline's validation writes it, whichever database it was read from:
    timestamps as UTC ISO-8601 text, JSON parsed, integers that SQLite or D1's JSON hand back
    as floats as integers."""
    if value is None:
        return None
    kind = col.type
    if kind == "text":
        return value if isinstance(value, str) else str(value)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if isinstance(value, bool | int) else value
    if kind == "float":
        return float(value) if isinstance(value, int | float) else value
    if kind == "decimal":
        # Exact from a source or PostgreSQL (NUMERIC); a double from SQLite or D1.
        if isinstance(value, float):
            return value
        try:
            return Decimal(str(value))
        except InvalidOperation:
            return value
    if kind == "timestamp":
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                return value
        if isinstance(value, datetime):
            dt = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
            return dt.isoformat()
        return value
    # json: text in SQLite and D1, parsed jsonb from PostgreSQL
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def same(col: Column, a: Any, b: Any) -> bool:
    if col.type == "float" and isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_REL_TOL)
    # A decimal read back from SQLite or D1 is a double.
    numbers = isinstance(a, float | Decimal) and isinstance(b, float | Decimal)
    if col.type == "decimal" and numbers and (isinstance(a, float) or isinstance(b, float)):
        return math.isclose(float(a), float(b), rel_tol=FLOAT_REL_TOL)
    return bool(a == b)


def key_text(stream: Stream, key: Key) -> str:
    """The key as the dead letters store it (shared/records.py record_key)."""
    row: list[Any] = [None] * len(stream.columns)
    for i, v in zip(stream.key_indexes, key, strict=True):
        row[i] = v
    return record_key(stream, row)


# -- sinks ---------------------------------------------------------------------------------------


class SinkReader(Protocol):
    name: str

    def keys(self, stream: Stream) -> Iterator[Key]: ...

    def rows(self, stream: Stream, keys: Sequence[Key]) -> Iterator[Sequence[Any]]: ...

    def orphans(self, stream: Stream, fk: ForeignKey, limit: int) -> tuple[int, list[Key]]: ...

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


# -- the source side ------------------------------------------------------------------------------


@dataclass
class SourceSide:
    """What the snapshot holds for one stream."""

    stream: Stream
    records: int = 0
    invalid: int = 0
    invalid_keys: set[str] = field(default_factory=set)
    keys: set[Key] = field(default_factory=set)
    # The sample: the keys with the smallest seeded hashes (a max-heap by negated hash), and
    # every valid source row of each (several rows may share a key; any of them may have won).
    heap: list[tuple[int, Key]] = field(default_factory=list)
    sampled: dict[Key, list[list[Any]]] = field(default_factory=dict)


def _hash(seed: int, key: Key) -> int:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big")


class SourceReader:
    def __init__(self, settings: Settings, sample: int, seed: int) -> None:
        self.settings = settings
        self.sample = sample
        self.seed = seed
        self.sides: dict[str, SourceSide] = {}
        self.validators: dict[str, Validator] = {}

    def read(self, rows: Iterator[tuple[str, list[Any]]]) -> None:
        pending: dict[str, list[list[Any]]] = {}
        for name, row in rows:
            batch = pending.setdefault(name, [])
            batch.append(row)
            if len(batch) >= VALIDATE_BATCH:
                self._take(name, batch)
                pending[name] = []
        for name, batch in pending.items():
            self._take(name, batch)

    def _take(self, name: str, rows: list[list[Any]]) -> None:
        stream = self.settings.stream(name)
        side = self.sides.get(name)
        if side is None:
            side = self.sides[name] = SourceSide(stream)
            self.validators[name] = Validator(stream)
        # The pipeline's validation, so what it would dead-letter is invalid here, not missing.
        good, bad = self.validators[name].validate(stream.column_names, rows)
        side.records += len(rows)
        side.invalid += len(bad)
        side.invalid_keys.update(record_key(stream, r.row) for r in bad)
        cols = stream.columns
        for row in good:
            norm = [canon(c, v) for c, v in zip(cols, row, strict=True)]
            key = tuple(norm[i] for i in stream.key_indexes)
            side.keys.add(key)
            self._offer(side, key, norm)

    def _offer(self, side: SourceSide, key: Key, row: list[Any]) -> None:
        if self.sample <= 0:
            return
        if key in side.sampled:
            side.sampled[key].append(row)
            return
        h = _hash(self.seed, key)
        if len(side.heap) < self.sample:
            heapq.heappush(side.heap, (-h, key))
        elif h < -side.heap[0][0]:
            _, out = heapq.heapreplace(side.heap, (-h, key))
            del side.sampled[out]
        else:
            return
        side.sampled[key] = [row]


# -- the report -----------------------------------------------------------------------------------


def _listed(keys: Sequence[Key] | set[Key], limit: int) -> dict[str, Any]:
    shown = sorted(keys)[:limit]
    return {"total": len(keys), "keys": [list(k) for k in shown]}


def _dead_letters(settings: Settings, source: str) -> dict[tuple[str, str], set[str]]:
    """Pending dead letters of this source: (stream, sink) → record keys."""
    store = open_state(settings)
    try:
        with store.read() as conn:
            found = conn.execute(
                text(
                    "SELECT stream, sink, record_key FROM failed_ingestions"
                    " WHERE source = :s AND status = 'pending'"
                ),
                {"s": source},
            ).all()
    except SQLAlchemyError as exc:
        raise SinkError(f"state store ({store.name}): {str(exc).strip().splitlines()[0]}") from exc
    finally:
        store.dispose()
    out: dict[tuple[str, str], set[str]] = {}
    for stream, sink, key in found:
        out.setdefault((stream, sink), set()).add(key)
    return out


def _feeders(settings: Settings) -> dict[str, list[str]]:
    """stream → the configured sources that feed it."""
    out: dict[str, list[str]] = {}
    for name, cfg in settings.sources.items():
        for s in cfg.streams:
            out.setdefault(s, []).append(name)
    return out


def _clock_skips(stream: Stream, row: list[Any], now_ms: int | None, ttl_ms: int) -> set[str]:
    """Columns of this KV snapshot row the source cannot know (see SKIPPED_COLUMNS); a D1
    source (now_ms None) knows every stream column."""
    if now_ms is None:
        return set()
    skip = set(KV_CLOCK_COLUMNS.get(stream.name, ()))
    if stream.name == "cache":
        names = stream.column_names
        if row[names.index("updated_at")] == now_ms:
            skip.add("updated_at")
        if row[names.index("expires_at")] == now_ms + ttl_ms:
            skip.add("expires_at")
    return skip


def _compare(
    stream: Stream,
    candidates: list[list[Any]],
    sink_row: list[Any],
    skips: list[set[str]],
) -> list[dict[str, Any]]:
    """[] when the sink row equals one of the source rows (columns the source cannot know
    aside); else the differences from the closest one."""
    best: list[dict[str, Any]] | None = None
    for row, skip in zip(candidates, skips, strict=True):
        diffs = [
            {"column": c.name, "source": row[i], "sink": sink_row[i]}
            for i, c in enumerate(stream.columns)
            if c.name not in skip and not same(c, row[i], sink_row[i])
        ]
        if not diffs:
            return []
        if best is None or len(diffs) < len(best):
            best = diffs
    return best or []


def reconcile(
    settings: Settings,
    source_name: str,
    *,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    limit: int = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """The report (see the module docstring) as a JSON-able dict; `ok` is False on any
    mismatch. Raises SluiceError when the source or a sink cannot be read or is not configured."""
    from sluice.producers.d1_source import D1Source
    from sluice.producers.kv_source import KvSource
    from sluice.producers.registry import open_source

    cfg = settings.source(source_name)
    stream_names = cfg.streams
    sinks_needed = [
        s
        for s in ("postgres", "sqlite", "d1")
        if any(s in settings.streams[n].sinks for n in stream_names)
    ]
    if not isinstance(cfg, D1SourceConfig | KvSourceConfig):
        raise SourceError(
            f"source {source_name!r} ({cfg.kind}) has no snapshot to reconcile against:"
            " only D1 and KV sources can be read whole",
            source=source_name,
        )
    started = time.perf_counter()
    source = open_source(settings, source_name)
    assert isinstance(source, D1Source | KvSource)
    now_ms: int | None = None
    ttl_ms = int(cfg.cache_ttl_seconds * 1000) if isinstance(cfg, KvSourceConfig) else 0
    reader = SourceReader(settings, sample, seed)
    try:
        if isinstance(cfg, KvSourceConfig):
            now_ms = int(time.time() * 1000)
            assert isinstance(source, KvSource)
            reader.read(source.snapshot(now_ms=now_ms))
        else:
            reader.read(source.snapshot())
    finally:
        source.close()
    source_seconds = time.perf_counter() - started

    letters = _dead_letters(settings, source_name)
    feeders = _feeders(settings)
    capture = cfg.capture if isinstance(cfg, D1SourceConfig) else None
    keeps_deleted = capture == "watermark" or (
        isinstance(cfg, D1SourceConfig) and capture == "snapshot" and not cfg.deletes
    )
    readers = open_readers(settings, sinks_needed)
    ok = True
    streams_doc: dict[str, Any] = {}
    try:
        for name in stream_names:
            stream = settings.stream(name)
            side = reader.sides.get(name) or SourceSide(stream)
            others = [f for f in feeders.get(name, []) if f != source_name]
            skipped = SKIPPED_COLUMNS.get(name) if isinstance(cfg, KvSourceConfig) else None
            sampled_keys = sorted(side.sampled)
            doc: dict[str, Any] = {
                "source": {
                    "records": side.records,
                    "keys": len(side.keys),
                    "invalid": side.invalid,
                },
                "skipped_columns": skipped or "none",
                "extra_checked": not others,
                "extra_note": (
                    f"not checked: {', '.join(others)} also feed(s) {name}, and rows do not"
                    " record their source"
                    if others
                    else f"checked: {source_name} is the only configured source of {name}"
                ),
                "dead_letters": {
                    sink: len(keys) for (s, sink), keys in sorted(letters.items()) if s == name
                },
                "sinks": {},
            }
            for sink in stream.sinks:
                r = readers[sink]
                in_sink = {
                    tuple(
                        canon(stream.columns[i], v)
                        for i, v in zip(stream.key_indexes, k, strict=True)
                    )
                    for k in r.keys(stream)
                }
                absent = side.keys - in_sink
                dead = letters.get((name, sink), set())
                lettered = {k for k in absent if key_text(stream, k) in dead}
                missing = absent - lettered
                extra = in_sink - side.keys if not others else set()
                differ: list[dict[str, Any]] = []
                checked = 0
                wanted = [k for k in sampled_keys if k in in_sink]
                for row in r.rows(stream, wanted):
                    norm = [canon(c, v) for c, v in zip(stream.columns, row, strict=True)]
                    key = tuple(norm[i] for i in stream.key_indexes)
                    candidates = side.sampled.get(key)
                    if candidates is None:
                        continue
                    checked += 1
                    skips = [_clock_skips(stream, c, now_ms, ttl_ms) for c in candidates]
                    for d in _compare(stream, candidates, norm, skips):
                        differ.append({"key": list(key), **d})
                orphan_total = 0
                orphan_keys: list[Key] = []
                for fk in stream.foreign_keys:
                    n, found = r.orphans(stream, fk, limit)
                    orphan_total += n
                    orphan_keys += found
                sink_doc = {
                    "rows": len(in_sink),
                    "count": len(side.keys) - len(absent),
                    "missing": _listed(missing, limit),
                    "dead_lettered": _listed(lettered, limit),
                    "extra": _listed(extra, limit) if not others else None,
                    "sample": {
                        "checked": checked,
                        "differ": len({tuple(d["key"]) for d in differ}),
                        "differences": differ[: limit * 4],
                    },
                    "orphans": {
                        "total": orphan_total,
                        "keys": [list(k) for k in orphan_keys[:limit]],
                        "parent": ", ".join(
                            f"{fk.column} → {fk.parent_table}.{fk.parent_column}"
                            for fk in stream.foreign_keys
                        )
                        or None,
                    },
                }
                if extra and keeps_deleted:
                    # Watermark, and snapshot without deletes, never remove a row: a key the
                    # table no longer holds is expected in the sinks.
                    sink_doc["deleted_at_source"] = _listed(extra, limit)
                    sink_doc["extra"] = _listed(set(), limit)
                    extra = set()
                sink_doc["ok"] = not (missing or extra or differ or orphan_total)
                ok = ok and bool(sink_doc["ok"])
                doc["sinks"][sink] = sink_doc
            streams_doc[name] = doc
    finally:
        for r in readers.values():
            r.close()
    return {
        "source": source_name,
        "kind": cfg.kind,
        "capture": capture,
        "ok": ok,
        "sample": sample,
        "seed": seed,
        "limit": limit,
        "streams": streams_doc,
        "seconds": {
            "source": round(source_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }


# -- the table ------------------------------------------------------------------------------------


def _key(k: Sequence[Any]) -> str:
    return "|".join(str(v) for v in k)


def format_report(doc: dict[str, Any]) -> str:
    verdict = "OK" if doc["ok"] else "MISMATCH"
    lines = [
        f"reconcile {doc['source']} ({doc['kind']}"
        + (f", {doc['capture']} capture" if doc.get("capture") else "")
        + f"): {verdict}"
        f" — sample {doc['sample']} per stream, seed {doc['seed']};"
        f" source read in {doc['seconds']['source']}s, total {doc['seconds']['total']}s",
        "",
        f"{'stream':<18}{'sink':<10}{'source':>9}{'invalid':>9}{'in sink':>9}{'missing':>9}"
        f"{'dead-let':>9}{'extra':>7}{'sampled':>9}{'differ':>8}{'orphans':>9}",
    ]
    details: list[str] = []
    notes: list[str] = []
    for name, s in doc["streams"].items():
        src = s["source"]
        for sink, d in s["sinks"].items():
            extra = "-" if d["extra"] is None else str(d["extra"]["total"])
            orphans = "-" if d["orphans"]["parent"] is None else str(d["orphans"]["total"])
            lines.append(
                f"{name:<18}{sink:<10}{src['keys']:>9}{src['invalid']:>9}{d['count']:>9}"
                f"{d['missing']['total']:>9}{d['dead_lettered']['total']:>9}{extra:>7}"
                f"{d['sample']['checked']:>9}{d['sample']['differ']:>8}{orphans:>9}"
                f"  {'ok' if d['ok'] else 'MISMATCH'}"
            )
            where = f"{name} in {sink}"
            if d["missing"]["total"]:
                details.append(
                    f"missing {where} ({d['missing']['total']}): "
                    + ", ".join(_key(k) for k in d["missing"]["keys"])
                )
            if d["dead_lettered"]["total"]:
                details.append(
                    f"dead-lettered, not in {sink}: {name} ({d['dead_lettered']['total']}): "
                    + ", ".join(_key(k) for k in d["dead_lettered"]["keys"])
                )
            if d["extra"] and d["extra"]["total"]:
                details.append(
                    f"extra {where} ({d['extra']['total']}): "
                    + ", ".join(_key(k) for k in d["extra"]["keys"])
                )
            if d.get("deleted_at_source", {}).get("total"):
                gone = d["deleted_at_source"]
                notes.append(
                    f"{name}: kept in {sink} though gone from the table ({doc['capture']} capture"
                    f" never deletes) ({gone['total']}): "
                    + ", ".join(_key(k) for k in gone["keys"])
                )
            for diff in d["sample"]["differences"]:
                details.append(
                    f"differs {where}: key {_key(diff['key'])} {diff['column']}:"
                    f" source {diff['source']!r}, sink {diff['sink']!r}"
                )
            if d["orphans"]["total"]:
                details.append(
                    f"orphans {where} ({d['orphans']['total']}, {d['orphans']['parent']}"
                    " missing): " + ", ".join(_key(k) for k in d["orphans"]["keys"])
                )
        if s["dead_letters"]:
            notes.append(
                f"{name}: dead letters pending for {doc['source']}: "
                + ", ".join(f"{k} {v}" for k, v in s["dead_letters"].items())
            )
        notes.append(
            f"{name}: skipped columns: {s['skipped_columns']}; extra keys {s['extra_note']}"
        )
    return "\n".join([*lines, *(["", *details] if details else []), "", *notes])

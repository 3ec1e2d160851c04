"""`sluice reconcile SOURCE`: does every sink hold what the source holds?

For each stream the source feeds, and each sink that stream writes to (postgres, sqlite, and the
remote D1 when configured), `compare` finds:

- counts: the source's distinct keys after the pipeline's own validation (shared/records.py), so a
  record the pipeline dead-letters is counted as invalid, not as missing; how many of those keys
  each sink holds; the dead letters pending for this source and stream, per sink;
- missing keys (in the source, not in a sink), split into those a pending dead letter accounts for
  and the rest; extra keys (in a sink, not in the source), only for a stream no other configured
  source feeds, since rows do not record their source; where the source's capture keeps deleted
  rows in the sinks, its extra keys are reported apart, as deleted at the source;
- rows an operator edited by hand (`sluice dlq edit`): a sink row equal to the edited record of
  one of this source's replayed letters, where the source's row is invalid, absent or different,
  is reported apart as repaired by edit (with its letter), neither extra nor a difference. A
  re-fetched or replayed record is the source's own and needs nothing: it compares as any row;
- a seeded random sample of keys compared field by field after normalisation (timestamps, floats,
  JSON text vs jsonb, integers SQLite or D1 return as floats), skipping the columns the source
  says it cannot know;
- referential integrity in each sink: child rows whose parent row is missing (Stream.foreign_keys).

The source is read once, through its read-only `snapshot()` (a source kind without one, an HTTP
API, cannot be reconciled); the sinks through ops/reconcile_sinks.py. The result is a
ReconcileReport (ops/reconcile_report.py: its JSON document and its table).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from sluice.ops.reconcile_report import (
    Difference,
    KeyList,
    Orphans,
    ReconcileReport,
    Repairs,
    SinkComparison,
    StreamComparison,
    render_reconcile,
)
from sluice.ops.reconcile_sinks import Key, SinkReader, open_readers
from sluice.producers.registry import open_source
from sluice.producers.source import Snapshotting
from sluice.shared.errors import SinkError, SourceError
from sluice.shared.letters import SOURCE_SINK, decode_record
from sluice.shared.records import Validator, record_key
from sluice.shared.settings import Settings
from sluice.shared.state import open_state
from sluice.shared.streams import Column, Stream

__all__ = ["ReconcileReport", "compare", "reconcile", "render_reconcile"]

DEFAULT_SAMPLE = 100
DEFAULT_LIMIT = 20  # keys listed per problem; the totals are always complete
VALIDATE_BATCH = 1000
FLOAT_REL_TOL = 1e-12  # doubles survive every sink; only D1's JSON could round the last digit
SINKS = ("postgres", "sqlite", "d1")


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
    # Per sampled key, per row: the columns the source cannot know (never compared).
    unknown: dict[Key, list[set[str]]] = field(default_factory=dict)
    # Every valid source row of each key an operator edited (sampled or not), to tell whether
    # the sink's edited row differs from the source's.
    watched: dict[Key, list[list[Any]]] = field(default_factory=dict)


def _hash(seed: int, key: Key) -> int:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big")


class SourceReader:
    """Takes in a snapshot: per stream, validates, counts and keys the rows, and keeps a seeded
    sample of keys with every row of each."""

    def __init__(
        self, settings: Settings, sample: int, seed: int, watch: dict[str, set[Key]] | None = None
    ) -> None:
        self.settings = settings
        self.sample = sample
        self.seed = seed
        self.watch = watch or {}
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
        watch = self.watch.get(name, set())
        for row in good:
            norm = [canon(c, v) for c, v in zip(cols, row, strict=True)]
            key = tuple(norm[i] for i in stream.key_indexes)
            side.keys.add(key)
            if key in watch:
                side.watched.setdefault(key, []).append(norm)
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


@dataclass
class Snapshot:
    """What reconcile needs of the source: its rows per stream, and what it says of them."""

    capture: str | None
    keeps_deleted: bool
    skipped: dict[str, str]  # per stream: the columns it cannot know, and why
    sides: dict[str, SourceSide]


def read_snapshot(
    settings: Settings,
    name: str,
    sample: int,
    seed: int,
    watch: dict[str, set[Key]] | None = None,
) -> Snapshot:
    """Read the source whole, once; `watch`: per stream, keys whose every row is kept (the
    edited ones). Raises SourceError for a source kind without a snapshot."""
    cfg = settings.source(name)
    source = open_source(settings, name)
    try:
        if not isinstance(source, Snapshotting):
            raise SourceError(
                f"source {name!r} ({cfg.kind}) has no snapshot to reconcile against:"
                " only D1 and KV sources can be read whole",
                source=name,
            )
        reader = SourceReader(settings, sample, seed, watch)
        reader.read(source.snapshot())
        for side in reader.sides.values():
            side.unknown = {
                key: [source.unknown_columns(side.stream, row) for row in rows]
                for key, rows in (side.watched | side.sampled).items()
            }
        skipped = {n: s for n in cfg.streams if (s := source.skipped_columns(n)) is not None}
        return Snapshot(source.capture, source.keeps_deleted, skipped, reader.sides)
    finally:
        source.close()


# -- one stream in one sink -----------------------------------------------------------------------


def compare(
    stream: Stream,
    side: SourceSide,
    reader: SinkReader,
    *,
    dead: set[str],
    check_extra: bool,
    keeps_deleted: bool,
    limit: int,
    edits: dict[Key, list[Edit]] | None = None,
) -> SinkComparison:
    """The stream in one sink against the source's side of it. `dead`: the record keys of this
    source's pending dead letters for the stream and sink; `check_extra`: whether the source is
    the stream's only one (rows do not record their source); `keeps_deleted`: whether keys the
    source deleted are expected in the sink; `edits`: the records operators edited by hand and
    queued to this sink, by key."""
    in_sink = {
        tuple(canon(stream.columns[i], v) for i, v in zip(stream.key_indexes, k, strict=True))
        for k in reader.keys(stream)
    }
    absent = side.keys - in_sink
    lettered = {k for k in absent if key_text(stream, k) in dead}
    missing = absent - lettered
    extra = in_sink - side.keys if check_extra else set()
    deleted = None
    if extra and keeps_deleted:
        # Such a capture never removes a row: a key the source no longer holds is expected.
        deleted, extra = KeyList.of(extra, limit), set()
    checked, differences = _sample(stream, side, reader, in_sink)
    repaired = _repaired(stream, side, reader, in_sink, edits or {})
    if repaired:
        # The operator's record, kept as they chose it: not extra, not a difference.
        extra -= repaired.keys()
        differences = [d for d in differences if d.key not in repaired]
    return SinkComparison(
        sink=reader.name,
        rows=len(in_sink),
        count=len(side.keys) - len(absent),
        missing=KeyList.of(missing, limit),
        dead_lettered=KeyList.of(lettered, limit),
        extra=KeyList.of(extra, limit) if check_extra else None,
        checked=checked,
        differ=len({d.key for d in differences}),
        differences=differences[: limit * 4],
        orphans=_orphans(stream, reader, limit),
        deleted_at_source=deleted,
        repaired_by_edit=Repairs.of(repaired, limit),
    )


@dataclass(frozen=True)
class Edit:
    """A record an operator edited and queued in place of a dead letter's, as the pipeline's
    validation writes it (normalised as `canon` does)."""

    letter: int
    row: list[Any]


def _repaired(
    stream: Stream,
    side: SourceSide,
    reader: SinkReader,
    in_sink: set[Key],
    edits: dict[Key, list[Edit]],
) -> dict[Key, int]:
    """The sink's keys whose row is an operator's edited record and not what the source holds
    (its row there invalid, gone or different): key → the edit's letter."""
    wanted = sorted(k for k in edits if k in in_sink)
    out: dict[Key, int] = {}
    for row in reader.rows(stream, wanted) if wanted else ():
        norm = [canon(c, v) for c, v in zip(stream.columns, row, strict=True)]
        key = tuple(norm[i] for i in stream.key_indexes)
        matching = [
            e for e in edits.get(key, []) if not differences(stream, key, [e.row], norm, [set()])
        ]
        if not matching:
            continue  # neither the edit nor (perhaps) the source: extra or differs, as any row
        source_rows = side.watched.get(key)
        if source_rows and not differences(
            stream, key, source_rows, norm, side.unknown.get(key) or [set() for _ in source_rows]
        ):
            continue  # the edit wrote what the source holds: nothing to say
        out[key] = max(e.letter for e in matching)
    return out


def _sample(
    stream: Stream, side: SourceSide, reader: SinkReader, in_sink: set[Key]
) -> tuple[int, list[Difference]]:
    """The sampled keys the sink holds, compared field by field: how many, and what differs."""
    checked = 0
    found: list[Difference] = []
    wanted = [k for k in sorted(side.sampled) if k in in_sink]
    for row in reader.rows(stream, wanted):
        norm = [canon(c, v) for c, v in zip(stream.columns, row, strict=True)]
        key = tuple(norm[i] for i in stream.key_indexes)
        candidates = side.sampled.get(key)
        if candidates is None:
            continue
        checked += 1
        unknown = side.unknown.get(key) or [set() for _ in candidates]
        found += differences(stream, key, candidates, norm, unknown)
    return checked, found


def differences(
    stream: Stream,
    key: Key,
    candidates: list[list[Any]],
    sink_row: list[Any],
    unknown: list[set[str]],
) -> list[Difference]:
    """[] when the sink row equals one of the source rows (columns the source cannot know
    aside); else the differences from the closest one."""
    best: list[Difference] | None = None
    for row, skip in zip(candidates, unknown, strict=True):
        diffs = [
            Difference(key, c.name, row[i], sink_row[i])
            for i, c in enumerate(stream.columns)
            if c.name not in skip and not same(c, row[i], sink_row[i])
        ]
        if not diffs:
            return []
        if best is None or len(diffs) < len(best):
            best = diffs
    return best or []


def _orphans(stream: Stream, reader: SinkReader, limit: int) -> Orphans:
    total = 0
    keys: list[Key] = []
    for fk in stream.foreign_keys:
        n, found = reader.orphans(stream, fk, limit)
        total += n
        keys += found
    parent = ", ".join(
        f"{fk.column} → {fk.parent_table}.{fk.parent_column}" for fk in stream.foreign_keys
    )
    return Orphans(total, keys[:limit], parent or None)


# -- the whole source -----------------------------------------------------------------------------


@dataclass
class Letters:
    """What the dead letters of one source say to reconcile."""

    pending: dict[tuple[str, str], set[str]]  # (stream, sink) → record keys
    edits: dict[tuple[str, str], dict[Key, list[Edit]]]  # (stream, sink) → key → edits

    def watch(self) -> dict[str, set[Key]]:
        """Per stream, the edited keys."""
        out: dict[str, set[Key]] = {}
        for (stream, _), by_key in self.edits.items():
            out.setdefault(stream, set()).update(by_key)
        return out


def _dead_letters(settings: Settings, source: str) -> Letters:
    """This source's pending dead letters, and the edited records its replayed letters queued
    (the last state of each: a replayed edit that failed again is pending, not an edit)."""
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
            edited = conn.execute(
                text(
                    "SELECT id, stream, sink, fixed_record FROM failed_ingestions"
                    " WHERE source = :s AND status = 'replayed' AND fixed_how = 'edit'"
                    " AND fixed_record IS NOT NULL"
                ),
                {"s": source},
            ).all()
    except SQLAlchemyError as exc:
        raise SinkError(f"state store ({store.name}): {str(exc).strip().splitlines()[0]}") from exc
    finally:
        store.dispose()
    out = Letters({}, {})
    for stream, sink, key in found:
        out.pending.setdefault((stream, sink), set()).add(key)
    for letter, stream_name, sink, fixed in edited:
        if stream_name not in settings.streams:
            continue
        stream = settings.stream(stream_name)
        # A letter of the source itself: its edit went to every sink of the stream.
        sinks = list(stream.sinks) if sink == SOURCE_SINK else [sink]
        for row in _edited_rows(stream, fixed):
            key = tuple(row[i] for i in stream.key_indexes)
            for s in sinks:
                out.edits.setdefault((stream_name, s), {}).setdefault(key, []).append(
                    Edit(int(letter), row)
                )
    return out


def _edited_rows(stream: Stream, fixed: Any) -> list[list[Any]]:
    """A letter's `fixed_record` as the sink wrote it: validated (as the ingest task does) and
    normalised; [] when it holds nothing the stream takes."""
    record = decode_record(bytes(fixed))
    if not isinstance(record, dict) or not isinstance(record.get("columns"), list):
        return []
    rows = record.get("rows") if "rows" in record else [record.get("row")]
    columns = record["columns"]
    if not isinstance(rows, list):
        return []
    ordered = []
    for row in rows:
        if isinstance(row, list) and len(row) == len(columns):
            values = dict(zip(columns, row, strict=True))
            ordered.append([values.get(c) for c in stream.column_names])
    good, _ = Validator(stream).validate(stream.column_names, ordered)
    return [[canon(c, v) for c, v in zip(stream.columns, r, strict=True)] for r in good]


def _feeders(settings: Settings) -> dict[str, list[str]]:
    """stream → the configured sources that feed it."""
    out: dict[str, list[str]] = {}
    for name, cfg in settings.sources.items():
        for s in cfg.streams:
            out.setdefault(s, []).append(name)
    return out


def reconcile(
    settings: Settings,
    source: str,
    *,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    limit: int = DEFAULT_LIMIT,
) -> ReconcileReport:
    """The source named `source` against every sink its streams write to (see the module
    docstring). `sample`: keys per stream compared field by field, picked by `seed`; `limit`:
    keys listed per problem. Raises SluiceError when the source or a sink cannot be read or is
    not configured, or the source has no snapshot."""
    cfg = settings.source(source)
    started = time.perf_counter()
    # The letters first: the source keeps every row of the keys operators edited.
    letters = _dead_letters(settings, source)
    read_started = time.perf_counter()
    snapshot = read_snapshot(settings, source, sample, seed, letters.watch())
    source_seconds = time.perf_counter() - read_started

    feeders = _feeders(settings)
    needed = [s for s in SINKS if any(s in settings.stream(n).sinks for n in cfg.streams)]
    readers = open_readers(settings, needed)
    streams: dict[str, StreamComparison] = {}
    try:
        for name in cfg.streams:
            stream = settings.stream(name)
            side = snapshot.sides.get(name) or SourceSide(stream)
            others = [f for f in feeders.get(name, []) if f != source]
            streams[name] = StreamComparison(
                source=source,
                stream=name,
                records=side.records,
                keys=len(side.keys),
                invalid=side.invalid,
                skipped_columns=snapshot.skipped.get(name),
                others=others,
                dead_letters={
                    sink: len(keys)
                    for (s, sink), keys in sorted(letters.pending.items())
                    if s == name
                },
                sinks={
                    sink: compare(
                        stream,
                        side,
                        readers[sink],
                        dead=letters.pending.get((name, sink), set()),
                        check_extra=not others,
                        keeps_deleted=snapshot.keeps_deleted,
                        limit=limit,
                        edits=letters.edits.get((name, sink)),
                    )
                    for sink in stream.sinks
                },
            )
    finally:
        for r in readers.values():
            r.close()
    return ReconcileReport(
        source=source,
        kind=cfg.kind,
        capture=snapshot.capture,
        sample=sample,
        seed=seed,
        limit=limit,
        streams=streams,
        source_seconds=source_seconds,
        total_seconds=time.perf_counter() - started,
    )

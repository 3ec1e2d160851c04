"""Change capture from a D1 table Sluice may only read: the `watermark` and `snapshot` modes.

Both keep their progress in the state store and move it only when every sink has committed a
page (its acknowledgement), like an HTTP source's cursor:

- watermark: rows after a cursor on an increasing column (`watermark_column`: the rowid, an
  integer id, or a timestamp), in (column, key) order so ties on the column are split by the
  key. The cursor is `[value, key]` of the last row of the newest page every sink committed, in
  `source_progress`; a run re-reads `lookback_seconds` before it for late timestamps. Inserts and
  `INSERT OR REPLACE` (a new rowid, a new time) are caught; an update in place that moves
  neither is not (use snapshot for such tables). Rows whose column is NULL are never read: the
  run says how many there are.
- snapshot: every run reads the whole table and keeps a content hash per stream key in
  `source_snapshots`; only new and changed rows are sent (the last by rowid when several share
  a key), and with `deletes = true` the keys that are gone, removed from every sink. A run does
  nothing while the previous run's pages are in flight, so hashes are compared with what the
  sinks hold.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgpack
import orjson
from sqlalchemy import bindparam, text
from sqlalchemy.exc import SQLAlchemyError

from sluice.producers.source import SourcePage
from sluice.shared.database import quote
from sluice.shared.errors import SourceError, TransientSourceError

if TYPE_CHECKING:
    from sluice.producers.d1_source import D1Source
    from sluice.shared.state import StateStore

log = logging.getLogger("sluice.d1_changes")

PARTITION = ""  # a D1 source has one cursor
IN_LIST = 99  # locators per `IN (…)`: within D1's 100 bound parameters


# -- values as SQLite orders them ----------------------------------------------------------------


def _sortable(value: Any) -> tuple[int, Any]:
    """A value ordered as SQLite's ORDER BY orders it: NULL, numbers, then text and blobs by
    their bytes (text that is not UTF-8 is read as bytes)."""
    if value is None:
        return (0, 0)
    if isinstance(value, bool | int | float):
        return (1, value)
    if isinstance(value, str):
        return (2, value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return (2, value)
    return (3, repr(value))


def _pack(value: Any) -> Any:
    """A key value as JSON can carry it (bytes tagged)."""
    return {"$hex": value.hex()} if isinstance(value, bytes) else value


def _unpack(value: Any) -> Any:
    return bytes.fromhex(value["$hex"]) if isinstance(value, dict) and "$hex" in value else value


def encode_values(values: Sequence[Any]) -> str:
    return orjson.dumps([_pack(v) for v in values]).decode()


def decode_values(text_: str) -> list[Any]:
    return [_unpack(v) for v in orjson.loads(text_)]


def shift_time_text(value: str, seconds: float) -> str:
    """`value` (an ISO-8601 time as the table holds it) moved back by `seconds`, written the same
    way (separator, fraction digits, zone), so it compares with the column's other texts."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    shifted = t - timedelta(seconds=seconds)
    fraction = re.search(r"[.,](\d+)", value)
    digits = len(fraction.group(1)) if fraction else 0
    spec = "seconds" if not digits else "milliseconds" if digits <= 3 else "microseconds"
    out = shifted.replace(tzinfo=None).isoformat(sep="T" if "T" in value else " ", timespec=spec)
    zone = "Z" if value.endswith("Z") else (t.isoformat()[-6:] if t.tzinfo else "")
    return out + zone


# -- watermark ------------------------------------------------------------------------------------


class WatermarkCapture:
    def __init__(self, source: D1Source) -> None:
        self.source = source
        cfg = source.cfg
        self.by_rowid = cfg.watermark_column == "rowid"
        self.column = "rowid" if self.by_rowid else quote(cfg.watermark_column)

    # The cursor, in the state store.

    def cursor(self, store: StateStore | None = None) -> list[Any] | None:
        """The committed cursor, from `store` when given (`sluice status` passes its own, which
        gives up connecting sooner), else from the source's state store."""
        try:
            with (store or self.source.state).read() as conn:
                found = conn.execute(
                    text("SELECT cursor FROM source_progress WHERE source = :s AND partition = :p"),
                    {"s": self.source.name, "p": PARTITION},
                ).scalar()
        except SQLAlchemyError as exc:
            raise TransientSourceError(
                f"cursor unavailable: {type(exc).__name__}", source=self.source.name
            ) from exc
        return decode_values(found) if found is not None else None

    def _start(self, after: Any | None) -> list[Any] | None:
        """Where this run reads from: after the newest page in flight, else the cursor minus the
        lookback, else the beginning."""
        if isinstance(after, list) and len(after) == 3 and after[0] == "watermark":
            return [after[1], after[2]]
        at = self.cursor()
        lookback = self.source.cfg.lookback_seconds
        if at is None or not lookback or self.by_rowid:
            return at
        value = at[0]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return [value - lookback, None]  # epoch seconds
        if isinstance(value, str):
            try:
                return [shift_time_text(value, lookback), None]
            except ValueError:
                self.source.anomalies.append(
                    f"lookback ignored: {value[:40]!r} is not an ISO-8601 time"
                )
        return at

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
        src = self.source
        start = self._start(after)
        size = src.cfg.batch_size
        order = self.column if self.by_rowid else f"{self.column}, {src.key}"
        self._count_nulls()
        for _ in range(max_pages):
            if start is None:
                where, params = f"{self.column} IS NOT NULL", []
            elif self.by_rowid:
                where, params = "rowid > ?", [start[0]]
            elif start[1] is None:  # a lookback point: every key at that value
                where, params = f"{self.column} >= ?", [start[0]]
            else:
                where = f"({self.column} > ? OR ({self.column} = ? AND {src.key} > ?))"
                params = [start[0], start[0], start[1]]
            read = self._read(where, params, order, size)
            if not read:
                return
            rows, ends, orders = read
            ack = {
                "capture": "watermark",
                "from": None if start is None else encode_values(start),
                "to": encode_values(ends[-1]),
            }
            start = ends[-1]
            yield SourcePage(rows=rows, ack=ack, last_key=["watermark", *start], orders=orders)
            if len(rows) < size:
                return

    def _read(
        self, where: str, params: list[object], order: str, size: int
    ) -> tuple[list[Sequence[Any]], list[list[Any]], list[int] | None] | None:
        """A page, per row its position ([watermark value, key], or [rowid, None]), and the
        rows' source order (rowids: a row replaced by INSERT OR REPLACE gets a higher one)."""
        src = self.source
        page = src.read(where, params, order, size, extra=None if self.by_rowid else self.column)
        if not page.rows:
            return None
        if self.by_rowid:
            ends = [[r, None] for r in page.rowids]
        else:
            ends = [[v, k] for v, k in zip(page.extras, page.keys, strict=True)]
        return page.rows, ends, src.orders_of(page)

    def _count_nulls(self) -> None:
        if self.by_rowid:
            return
        src = self.source
        found = src.db.query(
            f"SELECT count(*) AS n FROM {src.table} WHERE {self.column} IS NULL", []
        )
        n = int(found[0]["n"]) if found else 0
        if n:
            src.anomalies.append(
                f"{n} row(s) have no {src.cfg.watermark_column} and are not read in watermark mode"
            )

    def acknowledge(self, ack: Any) -> None:
        """Move the cursor to the page's end when it already reaches the page's start (pages
        are acknowledged in any order; a page acknowledged before an earlier one leaves the
        cursor where it is, and the next run reads it again)."""
        try:
            start = None if ack["from"] is None else decode_values(str(ack["from"]))
            end_text = str(ack["to"])
            end = decode_values(end_text)
        except (KeyError, ValueError, TypeError) as exc:
            raise SourceError(f"malformed acknowledgement: {exc}", source=self.source.name) from exc
        store = self.source.state
        lock = " FOR UPDATE" if store.dialect == "postgresql" else ""
        try:
            with store.write() as conn:
                found = conn.execute(
                    text(
                        "SELECT cursor FROM source_progress WHERE source = :s AND partition = :p"
                        + lock
                    ),
                    {"s": self.source.name, "p": PARTITION},
                ).scalar()
                params = {"s": self.source.name, "p": PARTITION, "c": end_text, "now": store.now()}
                if found is None:
                    if start is None:
                        conn.execute(
                            text(
                                "INSERT INTO source_progress (source, partition, cursor,"
                                " updated_at) VALUES (:s, :p, :c, :now)"
                                " ON CONFLICT (source, partition) DO NOTHING"
                            ),
                            params,
                        )
                    return
                at = [_sortable(v) for v in decode_values(found)]
                if _position(start) <= at < _position(end):
                    conn.execute(
                        text(
                            "UPDATE source_progress SET cursor = :c, updated_at = :now"
                            " WHERE source = :s AND partition = :p"
                        ),
                        params,
                    )
        except SQLAlchemyError as exc:  # the store is down: the ack task retries
            raise TransientSourceError(
                f"could not store the cursor: {type(exc).__name__}", source=self.source.name
            ) from exc


def _position(values: list[Any] | None) -> list[tuple[int, Any]]:
    """A cursor position as comparable tuples; None (the beginning) before everything. A
    lookback point (key None) comes before every key at its value."""
    if values is None:
        return [(-1, 0)]
    value, key = values
    return [_sortable(value), (-1, 0) if key is None else _sortable(key)]


# -- snapshot -------------------------------------------------------------------------------------


def content_hash(row: Sequence[Any]) -> str:
    data = msgpack.packb([_finite(v) for v in row], use_bin_type=True)
    return hashlib.sha256(data).hexdigest()[:32]


def _finite(value: Any) -> Any:
    # NaN never equals itself: hash its text so an unchanged NaN stays unchanged.
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


class SnapshotCapture:
    def __init__(self, source: D1Source) -> None:
        self.source = source

    def stored(self) -> dict[str, str]:
        try:
            with self.source.state.read() as conn:
                return {
                    str(k): str(h)
                    for k, h in conn.execute(
                        text("SELECT key, hash FROM source_snapshots WHERE source = :s"),
                        {"s": self.source.name},
                    )
                }
        except SQLAlchemyError as exc:
            raise TransientSourceError(
                f"snapshot state unavailable: {type(exc).__name__}", source=self.source.name
            ) from exc

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
        src = self.source
        if after is not None:
            log.info("source %s: pages of the last snapshot are in flight; nothing to do", src.name)
            return
        stored = self.stored()
        latest = self._scan()
        changed = sorted((loc, key, h) for key, (loc, h) in latest.items() if stored.get(key) != h)
        size = src.cfg.batch_size
        pages = 0
        for i in range(0, len(changed), size):
            if pages >= max_pages:
                return  # the rest is still different next run
            part = changed[i : i + size]
            rows = self._rows([loc for loc, _, _ in part])
            ack = {"capture": "snapshot", "set": [[k, h] for _, k, h in part], "delete": []}
            yield SourcePage(rows=rows, ack=ack, last_key=["snapshot", pages])
            pages += 1
        gone = sorted(set(stored) - set(latest))
        if not gone:
            return
        if not src.cfg.deletes:
            src.anomalies.append(
                f"{len(gone)} key(s) are gone from the table; kept in the sinks (deletes = false)"
            )
            return
        for i in range(0, len(gone), size):
            if pages >= max_pages:
                return
            keys = gone[i : i + size]
            ack = {"capture": "snapshot", "set": [], "delete": keys}
            yield SourcePage(
                rows=[decode_values(k) for k in keys],
                ack=ack,
                last_key=["snapshot", pages],
                op="delete",
            )
            pages += 1

    def _locator(self) -> str:
        return "rowid" if self.source.has_rowid else self.source.key

    def _scan(self) -> dict[str, tuple[Any, str]]:
        """Every row's stream key → (its locator, its content hash); the last by locator wins."""
        src = self.source
        position = self._locator()
        key_at = src.stream.key_indexes
        latest: dict[str, tuple[Any, str]] = {}
        after: Any = None
        while True:
            where = "1" if after is None else f"{position} > ?"
            read = src.read(where, [] if after is None else [after], position, src.cfg.batch_size)
            locators = read.rowids if src.has_rowid else read.keys
            for loc, row in zip(locators, read.rows, strict=True):
                key = encode_values([row[i] for i in key_at])
                latest[key] = (loc, content_hash(row))
            if len(read.rows) < src.cfg.batch_size:
                return latest
            after = locators[-1]

    def _rows(self, locators: list[Any]) -> list[Sequence[Any]]:
        src = self.source
        position = self._locator()
        out: list[Sequence[Any]] = []
        for i in range(0, len(locators), IN_LIST):
            part = locators[i : i + IN_LIST]
            marks = ", ".join("?" for _ in part)
            out += src.read(f"{position} IN ({marks})", list(part), position, len(part)).rows
        return out

    def acknowledge(self, ack: Any) -> None:
        """Record what every sink now holds: the page's new hashes, or its deleted keys."""
        try:
            updates = [{"s": self.source.name, "k": str(k), "h": str(h)} for k, h in ack["set"]]
            deleted = [str(k) for k in ack["delete"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise SourceError(f"malformed acknowledgement: {exc}", source=self.source.name) from exc
        try:
            with self.source.state.write() as conn:
                if updates:
                    conn.execute(
                        text(
                            "INSERT INTO source_snapshots (source, key, hash) VALUES (:s, :k, :h)"
                            " ON CONFLICT (source, key) DO UPDATE SET hash = excluded.hash"
                        ),
                        updates,
                    )
                if deleted:
                    conn.execute(
                        text(
                            "DELETE FROM source_snapshots WHERE source = :s AND key IN :keys"
                        ).bindparams(bindparam("keys", expanding=True)),
                        {"s": self.source.name, "keys": deleted},
                    )
        except SQLAlchemyError as exc:
            raise TransientSourceError(
                f"could not store the snapshot: {type(exc).__name__}", source=self.source.name
            ) from exc

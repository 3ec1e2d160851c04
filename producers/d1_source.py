"""D1 source: the rows of a D1 table, in pages, by one of three capture modes.

- mark (the default): rows with `processed_at IS NULL`, in arrival (rowid) or key order; a row
  is marked processed only after every sink has committed it (producers/ack.py calls
  `acknowledge`).
- watermark and snapshot: read-only (producers/d1_changes.py).

Two kinds of database share the same SQL:
- local: a D1 SQLite file, given directly or found in wrangler's state folder;
- remote: the D1 REST `/query` API (shared/cloudflare.py), keeping to 100 bound parameters.

Every configured column is checked against the table when the source opens: SQLite reads an
unknown double-quoted name as a string literal, so a typo in `key_column` would otherwise match
every row, and a missing column would come back as its own name.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from sluice.producers.source import LagBasis, SourcePage, SourceStatus
from sluice.shared.cloudflare import D1Client
from sluice.shared.database import is_busy, quote, sqlite_connect
from sluice.shared.errors import D1Error, MissingSecretError, SourceError, TransientSourceError
from sluice.shared.settings import D1SourceConfig, Settings
from sluice.shared.state import StateStore, open_state
from sluice.shared.streams import Stream
from sluice.shared.wrangler import d1_path

MAX_PARAMS = 100

log = logging.getLogger("sluice.d1_source")


class OverreachError(SourceError):
    """A statement changed more rows than allowed: its transaction was rolled back."""


class D1Database(Protocol):
    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]: ...

    def batch(
        self,
        statements: Sequence[tuple[str, Sequence[object]]],
        max_changes: Sequence[int] | None = None,
    ) -> None:
        """Run the statements in one transaction. With `max_changes` (one per statement), a
        statement changing more rows than its number rolls the whole batch back and raises
        OverreachError."""
        ...

    def close(self) -> None: ...


def _lenient_text(data: bytes) -> str | bytes:
    """A TEXT value as str, or as its bytes when they are not UTF-8 (SQLite stores whatever
    bytes it is given as text): the record is then read, and dead-lettered, not stuck."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _not_utf8(exc: sqlite3.OperationalError) -> bool:
    return "decode to UTF-8" in str(exc)


class LocalD1:
    """A local D1 file through sqlite3, with the same calls as the REST client.

    One connection per process, shared by the threads of a threads-pool worker, which
    acknowledge pages side by side: a lock keeps one thread's transaction from taking in
    another's statements (or its BEGIN from failing inside the other's transaction)."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        if not path.exists():
            raise SourceError(f"D1 file not found: {path}")
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        self.lenient_reads = 0  # reads that met text that is not UTF-8 (and kept its bytes)
        self._open()

    def _open(self) -> None:
        self._inode = self._path.stat().st_ino
        # Read and marked in arrival order (the default), a page touches few table pages, each
        # once: a small cache does, and it is part of the SQLite writer's memory.
        self._conn = sqlite_connect(self._path, self._busy_timeout_ms, cache_mib=4)
        self._conn.row_factory = sqlite3.Row

    def _reopen_if_replaced(self) -> None:
        # The ack task keeps this connection open across pages; if the file was replaced
        # (a new export, a restore), writes through it would land in the unlinked old file.
        try:
            inode = self._path.stat().st_ino
        except FileNotFoundError:
            raise SourceError(f"D1 file not found: {self._path}") from None
        if inode != self._inode:
            self._conn.close()
            self._open()

    def _read(self, fetch: Callable[[], Any]) -> Any:
        """Run a read; when a TEXT value is not UTF-8, read again keeping such values as bytes
        (the fast path decodes in C and fails on the first one)."""
        try:
            with self._lock:
                try:
                    return fetch()
                except sqlite3.OperationalError as exc:
                    if not _not_utf8(exc):
                        raise
                    self.lenient_reads += 1
                    self._conn.text_factory = _lenient_text
                    try:
                        return fetch()
                    finally:
                        self._conn.text_factory = str
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise TransientSourceError(str(exc)) from exc
            raise SourceError(str(exc)) from exc

    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        return list(self._read(lambda: [dict(r) for r in self._conn.execute(sql, tuple(params))]))

    def values(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples in the select order: cheaper than building a dict per row, which
        was the producer's main cost."""

        def fetch() -> list[tuple[Any, ...]]:
            # The cursor is taken under the lock: another thread's batch may reopen the file.
            with contextlib.closing(self._conn.cursor()) as cur:
                cur.row_factory = None
                return cur.execute(sql, tuple(params)).fetchall()

        return list(self._read(fetch))

    def batch(
        self,
        statements: Sequence[tuple[str, Sequence[object]]],
        max_changes: Sequence[int] | None = None,
    ) -> None:
        try:
            with self._lock:
                self._reopen_if_replaced()
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for i, (sql, params) in enumerate(statements):
                        changed = self._conn.execute(sql, tuple(params)).rowcount
                        if max_changes is not None and changed > max_changes[i]:
                            raise OverreachError(
                                f"statement {i} changed {changed} rows, more than the"
                                f" {max_changes[i]} it names"
                            )
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise TransientSourceError(str(exc)) from exc
            raise SourceError(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_OVERREACH = "sluice: too many rows changed"


class RemoteD1:
    """A remote D1 through its REST API. The client is made on first use, so a process without
    the API token (an operator's `sluice status`) still opens the source and reports the facts
    that need no request."""

    def __init__(self, client: Callable[[], D1Client]) -> None:
        self._make_client = client

    @cached_property
    def _client(self) -> D1Client:
        return self._make_client()

    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        return self._client.query(sql, params)

    def batch(
        self,
        statements: Sequence[tuple[str, Sequence[object]]],
        max_changes: Sequence[int] | None = None,
    ) -> None:
        if max_changes is None:
            self._client.batch(statements)
            return
        # A D1 batch is one transaction: after each statement, one that fails (json() of text
        # that is not JSON) when the statement changed too many rows rolls it all back.
        guarded: list[tuple[str, Sequence[object]]] = []
        for (sql, params), most in zip(statements, max_changes, strict=True):
            guarded.append((sql, params))
            guarded.append(
                (f"SELECT CASE WHEN changes() > ? THEN json('{_OVERREACH}') END", [most])
            )
        try:
            self._client.batch(guarded)
        except D1Error as exc:
            if "malformed JSON" in exc.message or _OVERREACH in exc.message:
                raise OverreachError(
                    "a statement changed more rows than it names; the batch was rolled back"
                ) from exc
            raise

    def close(self) -> None:
        pass


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


class ReadRows:
    """One page as read: the rows in the stream's column order, and per row its rowid (None for
    a table without rowids), the value of the source's key column and of an extra column."""

    def __init__(
        self,
        rows: list[Sequence[Any]],
        rowids: list[Any],
        keys: list[Any],
        extras: list[Any] | None = None,
    ) -> None:
        self.rows = rows
        self.rowids = rowids
        self.keys = keys
        self.extras = extras or []


@dataclass(kw_only=True)
class D1Status(SourceStatus):
    """A D1 source's own facts: how it reads, the rows of a local mark-mode table not processed
    yet (`unprocessed`), and the cursor of watermark capture. Its lag is its stream's."""

    lag_from: LagBasis | None = "stream"
    mode: str
    capture: str
    cursor: list[Any] | None = None  # watermark capture: [value, key] of the last committed row

    def facts(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "capture": self.capture,
            "unprocessed": self.unprocessed,
        }
        if self.capture == "watermark":
            # A key that is not UTF-8 text is read as bytes: shown as hex.
            out["cursor"] = (
                [v.hex() if isinstance(v, bytes) else v for v in self.cursor]
                if self.cursor is not None
                else None
            )
        return out


class D1Source:
    def __init__(
        self,
        name: str,
        cfg: D1SourceConfig,
        stream: Stream,
        db: D1Database,
        settings: Settings | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.cfg = cfg
        self.db = db
        self.settings = settings
        self.table = quote(cfg.table or stream.table)
        self.key = quote(cfg.key_column)
        self._cols = ", ".join(quote(c) for c in stream.column_names)
        # A local page is read as tuples; the key is read once when it is a stream column.
        names = stream.column_names
        self._key_at = names.index(cfg.key_column) if cfg.key_column in names else None
        self._order: str | None = None if cfg.order == "auto" else cfg.order
        self.anomalies: list[str] = []
        self._checked = False

    # -- the table ------------------------------------------------------------------------------

    @cached_property
    def columns(self) -> set[str]:
        """The table's column names ("PRAGMA table_info"); empty when there is no such table."""
        found = self.db.query(f"PRAGMA table_info({self.table})")
        return {str(r["name"]) for r in found}

    @cached_property
    def has_rowid(self) -> bool:
        try:
            self.db.query(f"SELECT rowid FROM {self.table} LIMIT 0")
        except TransientSourceError:
            raise
        except SourceError as exc:
            if getattr(exc, "transient", False):
                raise
            return False  # a WITHOUT ROWID table
        return True

    def check(self) -> list[str]:
        """What is wrong between the configuration and the table (empty when nothing is)."""
        table = self.cfg.table or self.stream.table
        columns = self.columns
        if not columns:
            return [f"table {table!r} not found in the D1 database"]
        problems = []
        wanted = {
            "key_column": [self.cfg.key_column],
            f"stream {self.stream.name}": list(self.stream.column_names),
        }
        if self.cfg.capture == "mark":
            wanted["mark capture"] = ["processed_at"]
        if self.cfg.capture == "watermark":
            wanted["watermark_column"] = [self.cfg.watermark_column]
        for what, names in wanted.items():
            for column in names:
                if column == "rowid" and self.has_rowid and what != f"stream {self.stream.name}":
                    continue
                if column not in columns:
                    problems.append(
                        f"{what}: column {column!r} is not in table {table!r}"
                        f" (it has: {', '.join(sorted(columns))})"
                    )
        return problems

    def ensure_checked(self) -> None:
        if self._checked:
            return
        problems = self.check()
        if problems:
            raise SourceError("; ".join(problems), source=self.name)
        self._checked = True

    def read(
        self,
        where: str,
        params: list[object],
        order_by: str,
        limit: int,
        extra: str | None = None,
    ) -> ReadRows:
        """One page: `SELECT … WHERE <where> ORDER BY <order_by> LIMIT <limit>`, with the rowid
        (when the table has one), the key column and `extra` (an SQL expression) beside it."""
        lead = ["rowid"] if self.has_rowid else []
        if self._key_at is None:
            lead.append(self.key)
        if extra is not None:
            lead.append(extra)
        key_pos = len(lead) - (2 if extra is not None else 1)  # when the key is a lead column
        sql = "SELECT {} FROM " + f"{self.table} WHERE {where} ORDER BY {order_by} LIMIT ?"
        if isinstance(self.db, LocalD1):
            before = self.db.lenient_reads
            values = self.db.values(sql.format(", ".join([*lead, self._cols])), [*params, limit])
            lenient = self.db.lenient_reads != before
        else:
            # Remote rows are objects: every column gets a position alias.
            aliases = [*lead, *(quote(c) for c in self.stream.column_names)]
            select = ", ".join(f"{c} AS c{i}" for i, c in enumerate(aliases))
            found = self.db.query(sql.format(select), [*params, limit])
            values = [tuple(r[f"c{i}"] for i in range(len(aliases))) for r in found]
            lenient = False
        skip = len(lead)
        rows: list[Sequence[Any]] = [r[skip:] for r in values] if skip else list(values)
        rowids = [r[0] for r in values] if self.has_rowid else [None] * len(values)
        if self._key_at is None:
            keys = [r[key_pos] for r in values]
        else:
            keys = [r[self._key_at] for r in rows]
        extras = [r[skip - 1] for r in values] if extra is not None else None
        read = ReadRows(rows, rowids, keys, extras)
        if lenient:
            self._report_bytes(read)
        return read

    def _report_bytes(self, read: ReadRows) -> None:
        """Values that are not UTF-8 travel as bytes (validation dead-letters their record);
        the run names each such row, by key and rowid."""
        names = self.stream.column_names
        for row, rowid, key in zip(read.rows, read.rowids, read.keys, strict=True):
            bad = [names[i] for i, v in enumerate(row) if isinstance(v, bytes)]
            if bad:
                self.anomalies.append(
                    f"row rowid={rowid} key={key!r}: {', '.join(bad)} not UTF-8 (dead-lettered)"
                )

    # -- capture --------------------------------------------------------------------------------

    @property
    def order(self) -> str:
        """ "rowid" (arrival order) or "key"; resolved on first use when configured "auto"."""
        if self._order is None:
            self._order = self._pick_order()
        return self._order

    def _pick_order(self) -> str:
        # Arrival (rowid) order keeps a page's rows on neighbouring table pages: reading and
        # marking them then touches a few pages instead of one per row (random ids). It needs the
        # planner to walk `processed_at IS NULL` in rowid order: an index on processed_at alone
        # does, no index does (rowid range); an index on (processed_at, id) would make it sort
        # every unprocessed row per page.
        if not self.has_rowid:
            log.warning("source %s reads in key order: the table has no rowid", self.name)
            return "key"
        probe = (
            f"EXPLAIN QUERY PLAN SELECT rowid FROM {self.table} WHERE processed_at IS NULL"
            " AND rowid > ? ORDER BY rowid LIMIT ?"
        )
        try:
            plan = " ".join(str(r.get("detail", "")) for r in self.db.query(probe, [0, 1]))
        except SourceError as exc:
            if exc.transient:
                raise  # a D1 hiccup is not a property of the table: the run fails, retried
            log.warning("source %s reads in key order: no rowid order (%s)", self.name, exc)
            return "key"
        if "TEMP B-TREE" in plan:
            log.warning(
                "source %s reads in key order: its indexes would sort every page in rowid order"
                " (create an index on %s(processed_at) alone for the faster arrival order)",
                self.name,
                self.table,
            )
            return "key"
        return "rowid"

    @cached_property
    def state(self) -> StateStore:
        assert self.settings is not None, "the read-only modes keep their progress in the state"
        return open_state(self.settings)

    @cached_property
    def changes(self) -> Any:
        """The read-only capture (watermark or snapshot) of this source."""
        from sluice.producers.d1_changes import SnapshotCapture, WatermarkCapture

        kind = WatermarkCapture if self.cfg.capture == "watermark" else SnapshotCapture
        return kind(self)

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
        self.ensure_checked()
        if self.cfg.capture == "mark":
            yield from self._unprocessed(after, max_pages)
        else:
            yield from self.changes.pages(after, max_pages)

    def _unprocessed(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
        size = self.cfg.batch_size
        by_rowid = self.order == "rowid"
        position = "rowid" if by_rowid else self.key
        # A rowid resume point is tagged ["rowid", n], so an integer key is never taken for
        # one. A resume point of the other order (a page in flight across a change of `order`)
        # means nothing here: start over; pages read twice are absorbed by the sinks.
        if isinstance(after, list):
            after = after[1] if by_rowid and len(after) == 2 and after[0] == "rowid" else None
        elif by_rowid:
            after = None
        for _ in range(max_pages):
            where = "processed_at IS NULL" + ("" if after is None else f" AND {position} > ?")
            read = self.read(where, [] if after is None else [after], position, size)
            if not read.rows:
                return
            after = read.rowids[-1] if by_rowid else read.keys[-1]
            yield SourcePage(
                rows=read.rows,
                ack=self._ack_of(read, by_rowid),
                last_key=["rowid", after] if by_rowid else after,
                orders=self.orders_of(read),
            )
            if len(read.rows) < size:
                return

    def orders_of(self, read: ReadRows) -> list[int] | None:
        """The rows' source order: their rowids, stable however often a row is read (a page
        read again after its lease ran out keeps its place); None for a table without."""
        return list(read.rowids) if self.has_rowid else None

    def _ack_of(self, read: ReadRows, by_rowid: bool) -> Any:
        """What marks the page's rows: rowids with their keys, or (read in key order, and every
        key a plain value) the keys alone."""
        plain = all(k is not None and not isinstance(k, bytes) for k in read.keys)
        if not self.has_rowid or (not by_rowid and plain):
            return read.keys
        return {"rowid": read.rowids, "key": read.keys}

    def read_key(self, key: str) -> list[Any] | None:
        """The row whose stream key reads as `key` (a dead letter's key: the key columns'
        values joined with "|"), processed or not, in the stream's column order; None when the
        table no longer holds it (a dead letter's re-fetch)."""
        self.ensure_checked()
        names = self.stream.key
        parts = key.split("|", len(names) - 1) if len(names) > 1 else [key]
        if key.startswith("sha1:") or len(parts) != len(names):
            raise SourceError(
                f"dead letter key {key!r} is not a key of {self.stream.name}: its record had"
                " no usable key, so it cannot be found in the table",
                source=self.name,
            )
        where = " AND ".join(f"{quote(c)} = ?" for c in names)
        read = self.read(where, list(parts), self.key, 1)
        return list(read.rows[0]) if read.rows else None

    def snapshot(self) -> Iterator[tuple[str, list[Any]]]:
        """(stream, row) for every row of the source table, processed or not, in the stream's
        column order; read-only (`sluice reconcile`). Keyset pages on the rowid (or the key of a
        table without one), so a remote D1 is read a page per request with two parameters."""
        self.ensure_checked()
        position = "rowid" if self.has_rowid else self.key
        after: Any = None
        while True:
            where = "1" if after is None else f"{position} > ?"
            read = self.read(where, [] if after is None else [after], position, self.cfg.batch_size)
            for row in read.rows:
                yield self.stream.name, list(row)
            if len(read.rows) < self.cfg.batch_size:
                return
            after = read.rowids[-1] if self.has_rowid else read.keys[-1]

    # -- what reconcile and status ask ----------------------------------------------------------

    @property
    def capture(self) -> str:
        return self.cfg.capture

    @property
    def keeps_deleted(self) -> bool:
        """Watermark capture, and snapshot capture without `deletes`, never remove a row from
        the sinks: a key the table no longer holds is expected there."""
        return self.cfg.capture == "watermark" or (
            self.cfg.capture == "snapshot" and not self.cfg.deletes
        )

    def unknown_columns(self, stream: Stream, row: Sequence[Any]) -> set[str]:
        """None: every stream column is read from the table as it is."""
        return set()

    def skipped_columns(self, stream: str) -> str | None:
        return None

    def status(self, state: StateStore | None) -> D1Status:
        """Mode and capture; the rows not processed yet of a local mark-mode table (a remote
        one is not counted: D1 bills every row a count reads) and the event time of the oldest
        (`oldest_unprocessed`); the watermark cursor."""
        out = D1Status(mode=self.cfg.mode, capture=self.cfg.capture)
        if self.cfg.capture == "mark":
            out.read("unprocessed", lambda: self._backlog(out))
        if self.cfg.capture == "watermark" and state is not None:
            out.cursor = out.read("cursor", lambda: self.changes.cursor(state))
            if "cursor" not in out.errors:
                out.read("backlog", lambda: self._after_watermark(out))
        return out

    def _backlog(self, out: D1Status) -> None:
        """Rows not processed yet: locally their count and least event time (the stream's first
        timestamp column); on a remote D1, where every row read is billed, only the event time
        of the first one found (arrival order, with an index on processed_at)."""
        col = next((c.name for c in self.stream.columns if c.type == "timestamp"), None)
        time_sql = quote(col) if col else "NULL"
        pending = f"FROM {self.table} WHERE processed_at IS NULL"
        if self.cfg.mode == "local":
            found = self.db.query(f"SELECT count(*) AS n, min({time_sql}) AS t {pending}")[0]
            out.unprocessed = int(found["n"])
            out.caught_up = out.unprocessed == 0
            oldest = found["t"] if out.unprocessed else None
        else:
            first = self.db.query(f"SELECT {time_sql} AS t {pending} LIMIT 1")
            out.caught_up = not first
            oldest = first[0]["t"] if first else None
        out.oldest_unprocessed = event_time(oldest)

    def _after_watermark(self, out: D1Status) -> None:
        """Watermark capture: the event time of the first row after the committed cursor (in
        watermark order: one row read), or caught up when there is none."""
        col = next((c.name for c in self.stream.columns if c.type == "timestamp"), None)
        time_sql = quote(col) if col else "NULL"
        mark = self.changes.column
        by_rowid = self.cfg.watermark_column == "rowid"
        at = out.cursor
        if at is None:
            where, params = f"{mark} IS NOT NULL", []
        elif by_rowid or at[1] is None:
            where, params = f"{mark} > ?", [at[0]]
        else:
            where = f"({mark} > ? OR ({mark} = ? AND {self.key} > ?))"
            params = [at[0], at[0], at[1]]
        order = mark if by_rowid else f"{mark}, {self.key}"
        first = self.db.query(
            f"SELECT {time_sql} AS t FROM {self.table} WHERE {where} ORDER BY {order} LIMIT 1",
            params,
        )
        out.caught_up = not first
        out.oldest_unprocessed = event_time(first[0]["t"]) if first else None

    def acknowledge(self, ack: Any) -> None:
        if isinstance(ack, dict) and "capture" in ack:
            self.changes.acknowledge(ack)
        else:
            self._mark(ack)

    def _mark(self, ack: Any) -> None:
        """Mark the page's rows processed; rows already marked keep their first time.

        A page read with rowids is marked by rowid *and* key: the rowid finds the row without an
        index lookup, the key makes sure it is still the row that was read (a VACUUM may
        renumber rowids of tables without an INTEGER PRIMARY KEY; a row it moved stays unmarked
        and is read again, never marked unread). A NULL key (`IS NULL`) and a key that is not
        UTF-8 text (compared as text) are matched row by row. No statement may mark more rows
        than it names: a key column that is not unique would mark rows never read, so the
        transaction is rolled back instead."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        statements: list[tuple[str, list[object]]] = []
        limits: list[int] = []
        if isinstance(ack, dict):
            pairs = list(zip(ack["rowid"], ack["key"], strict=True))
            per = (MAX_PARAMS - 1) // 2  # one parameter is the timestamp
            for i in range(0, len(pairs), per):
                chunk = pairs[i : i + per]
                statements.append(self._mark_pairs(chunk, now))
                limits.append(len(chunk))
        else:
            keys = list(ack)
            per = MAX_PARAMS - 1
            for i in range(0, len(keys), per):
                chunk = keys[i : i + per]
                statements.append(
                    (
                        f"UPDATE {self.table} SET processed_at = ? WHERE {self.key} IN"
                        f" ({_marks(chunk)}) AND processed_at IS NULL",
                        [now, *chunk],
                    )
                )
                limits.append(len(chunk))
        if not statements:
            return
        try:
            self.db.batch(statements, limits)
        except OverreachError as exc:
            raise SourceError(
                f"marking a page would change more rows than it read ({exc.message}): is"
                f" {self.cfg.key_column!r} unique in the table? Nothing was marked",
                source=self.name,
            ) from exc

    def _mark_pairs(self, pairs: list[tuple[Any, Any]], now: str) -> tuple[str, list[object]]:
        if all(k is not None and not isinstance(k, bytes) for _, k in pairs):
            rowids = [r for r, _ in pairs]
            keys = [k for _, k in pairs]
            return (
                f"UPDATE {self.table} SET processed_at = ? WHERE rowid IN ({_marks(rowids)})"
                f" AND {self.key} IN ({_marks(keys)}) AND processed_at IS NULL",
                [now, *rowids, *keys],
            )
        terms = []
        params: list[object] = [now]
        for rowid, key in pairs:
            if key is None:
                terms.append(f"(rowid = ? AND {self.key} IS NULL)")
                params.append(rowid)
            else:
                value = "CAST(? AS TEXT)" if isinstance(key, bytes) else "?"
                terms.append(f"(rowid = ? AND {self.key} = {value})")
                params += [rowid, key]
        return (
            f"UPDATE {self.table} SET processed_at = ? WHERE processed_at IS NULL"
            f" AND ({' OR '.join(terms)})",
            params,
        )

    def close(self) -> None:
        self.db.close()
        if "state" in self.__dict__:
            self.state.dispose()


def event_time(value: Any) -> datetime | None:
    """A row's event time as the table holds it (ISO-8601 text, naive meaning UTC, or epoch
    seconds or milliseconds), in UTC; None when it is none of these."""
    try:
        if isinstance(value, str):
            t = datetime.fromisoformat(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            t = datetime.fromtimestamp(value / 1000 if abs(value) >= 1e11 else value, UTC)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def open_d1_source(name: str, cfg: D1SourceConfig, settings: Settings) -> D1Source:
    stream = settings.stream(cfg.stream)
    db: D1Database
    if cfg.mode == "local":
        if cfg.path:
            path = Path(cfg.path)
        else:
            assert cfg.wrangler_state and cfg.database_id
            path = d1_path(Path(cfg.wrangler_state), cfg.database_id)
        db = LocalD1(path, settings.pipeline.sqlite_busy_timeout_ms)
    else:
        assert cfg.account_id and cfg.database_id
        account_id, database_id = cfg.account_id, cfg.database_id

        def client() -> D1Client:
            token = settings.secret(cfg.api_token_env)
            if not token:
                raise MissingSecretError(
                    f"remote D1 needs an API token in ${cfg.api_token_env}", source=name
                )
            return D1Client(
                account_id=account_id,
                database_id=database_id,
                api_token=token,
                base_url=cfg.base_url,
            )

        db = RemoteD1(client)
    return D1Source(name, cfg, stream, db, settings)

"""D1 source: rows of a D1 table with `processed_at IS NULL`, in arrival (rowid) or key order.

Seed 000's rule, kept across the queue: a row is marked processed only after every sink has
committed it (producers/ack.py calls `acknowledge`). Two modes share the same SQL:
- local: a D1 SQLite file, given directly or found in wrangler's state folder (apis.md §2.5);
- remote: the D1 REST `/query` API (producers/d1_rest.py), keeping to 100 bound parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from producers.d1_rest import D1Client
from producers.source import SourcePage
from shared.database import sqlite_connect
from shared.errors import SourceError, TransientSourceError
from shared.settings import D1SourceConfig, Settings
from shared.streams import Stream

MAX_PARAMS = 100

log = logging.getLogger("sluice.d1_source")


def miniflare_object_filename(name: str, unique_key: str = "miniflare-D1DatabaseObject") -> str:
    """The file name wrangler/miniflare gives a local D1 database (apis.md §2.5)."""
    key = hashlib.sha256(unique_key.encode()).digest()
    name_hmac = hmac.new(key, name.encode(), hashlib.sha256).digest()[:16]
    mac = hmac.new(key, name_hmac, hashlib.sha256).digest()[:16]
    return (name_hmac + mac).hex() + ".sqlite"


def wrangler_d1_path(state_dir: Path, database_id: str) -> Path:
    return (
        state_dir
        / "v3"
        / "d1"
        / "miniflare-D1DatabaseObject"
        / miniflare_object_filename(database_id)
    )


class D1Database(Protocol):
    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]: ...

    def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> Any: ...

    def close(self) -> None: ...


class LocalD1:
    """A local D1 file through sqlite3, with the same two calls as the REST client.

    One connection per process, shared by the threads of a threads-pool worker, which
    acknowledge pages side by side: a lock keeps one thread's transaction from taking in
    another's statements (or its BEGIN from failing inside the other's transaction)."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        if not path.exists():
            raise SourceError(f"D1 file not found: {path}")
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        self._inode = self._path.stat().st_ino
        # Read and marked in arrival order (the default), a page touches few table pages, each
        # once: a small cache does. The SQLite writer keeps this connection for its marks, and
        # 16 MiB cost it 13 MB of its 250 (4 MiB: same speed in alternating runs).
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

    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        try:
            with self._lock:
                return [dict(r) for r in self._conn.execute(sql, tuple(params))]
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise TransientSourceError(str(exc)) from exc
            raise SourceError(str(exc)) from exc

    def values(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples in the select order: a page read this way costs about half of
        building a dict per row (the producer's main cost)."""
        try:
            # The cursor is taken under the lock too: another thread's batch may reopen the file.
            with self._lock, contextlib.closing(self._conn.cursor()) as cur:
                cur.row_factory = None
                return cur.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise TransientSourceError(str(exc)) from exc
            raise SourceError(str(exc)) from exc

    def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> None:
        try:
            with self._lock:
                self._reopen_if_replaced()
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        self._conn.execute(sql, tuple(params))
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise TransientSourceError(str(exc)) from exc
            raise SourceError(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class RemoteD1:
    def __init__(self, client: D1Client) -> None:
        self._client = client

    def query(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        return self._client.query(sql, params)

    def batch(self, statements: Sequence[tuple[str, Sequence[object]]]) -> Any:
        return self._client.batch(statements)

    def close(self) -> None:
        pass


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class D1Source:
    def __init__(self, name: str, cfg: D1SourceConfig, stream: Stream, db: D1Database) -> None:
        self.name = name
        self.stream = stream
        self.cfg = cfg
        self.db = db
        self.table = _quote(cfg.table or stream.table)
        self.key = _quote(cfg.key_column)
        self._cols = ", ".join(_quote(c) for c in stream.column_names)
        self._select_cols = f"{self.key} AS sluice_key, {self._cols}"
        # A local page is read as tuples; the key is read once when it is a stream column.
        names = stream.column_names
        self._key_at = names.index(cfg.key_column) if cfg.key_column in names else None
        self._order: str | None = None if cfg.order == "auto" else cfg.order

    @property
    def order(self) -> str:
        """ "rowid" (arrival order) or "key"; resolved on first use when configured "auto"."""
        if self._order is None:
            self._order = self._pick_order()
        return self._order

    def _pick_order(self) -> str:
        # Arrival (rowid) order keeps a page's rows on neighbouring table pages: reading and
        # marking them then touches a few pages instead of one per row (random ids), about 4x
        # less work (README "Performance"). It needs the planner to walk `processed_at IS NULL`
        # in rowid order: an index on processed_at alone does, no index does (rowid range);
        # an index on (processed_at, id) would make it sort every unprocessed row per page.
        probe = (
            f"EXPLAIN QUERY PLAN SELECT rowid FROM {self.table} WHERE processed_at IS NULL"
            " AND rowid > ? ORDER BY rowid LIMIT ?"
        )
        try:
            plan = " ".join(str(r.get("detail", "")) for r in self.db.query(probe, [0, 1]))
        except TransientSourceError:
            raise
        except SourceError as exc:  # e.g. a WITHOUT ROWID table
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

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
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
            params: list[object] = ([] if after is None else [after]) + [size]
            rowids, keys, rows = self._read(where, position, params)
            if not rows:
                return
            after = rowids[-1] if by_rowid else keys[-1]
            ack: Any = {"rowid": rowids, "key": keys} if by_rowid else keys
            yield SourcePage(rows=rows, ack=ack, last_key=["rowid", after] if by_rowid else after)
            if len(rows) < size:
                return

    def _read(
        self, where: str, position: str, params: list[object]
    ) -> tuple[list[Any], list[Any], list[Sequence[Any]]]:
        """One page: (rowids or [], keys, rows in the stream's column order, as tuples: msgpack
        sends them as it sends lists, without a copy of every row)."""
        by_rowid = position == "rowid"
        if isinstance(self.db, LocalD1):
            lead = ["rowid"] if by_rowid else []
            if self._key_at is None:
                lead.append(self.key)
            select = ", ".join([*lead, self._cols])
            sql = f"SELECT {select} FROM {self.table} WHERE {where} ORDER BY {position} LIMIT ?"
            values = self.db.values(sql, params)
            skip = len(lead)
            rowids = [r[0] for r in values] if by_rowid else []
            rows: list[Sequence[Any]] = [r[skip:] for r in values] if skip else list(values)
            if self._key_at is None:
                keys = [r[skip - 1] for r in values]
            else:
                keys = [r[self._key_at] for r in rows]
            return rowids, keys, rows
        select = ("rowid AS sluice_rowid, " if by_rowid else "") + self._select_cols
        sql = f"SELECT {select} FROM {self.table} WHERE {where} ORDER BY {position} LIMIT ?"
        found = self.db.query(sql, params)
        names = self.stream.column_names
        rowids = [r["sluice_rowid"] for r in found] if by_rowid else []
        return rowids, [r["sluice_key"] for r in found], [[r[c] for c in names] for r in found]

    def snapshot(self) -> Iterator[tuple[str, list[Any]]]:
        """(stream, row) for every row of the source table, processed or not, in the stream's
        column order; read-only (`sluice reconcile`). Keyset pages on the key column, so a
        remote D1 is read a page per request with two bound parameters."""
        size = self.cfg.batch_size
        names = self.stream.column_names
        after: Any = None
        while True:
            if after is None:
                sql = f"SELECT {self._select_cols} FROM {self.table} ORDER BY {self.key} LIMIT ?"
                params: list[object] = [size]
            else:
                sql = (
                    f"SELECT {self._select_cols} FROM {self.table} WHERE {self.key} > ?"
                    f" ORDER BY {self.key} LIMIT ?"
                )
                params = [after, size]
            found = self.db.query(sql, params)
            for r in found:
                yield self.stream.name, [r[c] for c in names]
            if len(found) < size:
                return
            after = found[-1]["sluice_key"]

    def acknowledge(self, ack: Any) -> None:
        """Mark the page's rows processed; rows already marked keep their first time.

        A rowid page is marked by rowid *and* key: the rowid finds the row without an index
        lookup, the key makes sure it is still the row that was read (a VACUUM may renumber
        rowids of tables without an INTEGER PRIMARY KEY; a row it moved stays unmarked and is
        read again, never marked unread)."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        statements = []
        if isinstance(ack, dict):
            rowids, keys = list(ack["rowid"]), list(ack["key"])
            per = (MAX_PARAMS - 1) // 2  # one parameter is the timestamp
            for i in range(0, len(keys), per):
                r, k = rowids[i : i + per], keys[i : i + per]
                statements.append(
                    (
                        f"UPDATE {self.table} SET processed_at = ? WHERE rowid IN ({_marks(r)})"
                        f" AND {self.key} IN ({_marks(k)}) AND processed_at IS NULL",
                        [now, *r, *k],
                    )
                )
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
        if statements:
            self.db.batch(statements)

    def close(self) -> None:
        self.db.close()


def open_d1_source(name: str, cfg: D1SourceConfig, settings: Settings) -> D1Source:
    stream = settings.stream(cfg.stream)
    db: D1Database
    if cfg.mode == "local":
        if cfg.path:
            path = Path(cfg.path)
        else:
            assert cfg.wrangler_state and cfg.database_id
            path = wrangler_d1_path(Path(cfg.wrangler_state), cfg.database_id)
        db = LocalD1(path, settings.pipeline.sqlite_busy_timeout_ms)
    else:
        token = settings.secret(cfg.api_token_env)
        if not token:
            raise SourceError(f"remote D1 needs an API token in ${cfg.api_token_env}", source=name)
        assert cfg.account_id and cfg.database_id
        db = RemoteD1(
            D1Client(
                account_id=cfg.account_id,
                database_id=cfg.database_id,
                api_token=token,
                base_url=cfg.base_url,
            )
        )
    return D1Source(name, cfg, stream, db)

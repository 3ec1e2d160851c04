"""Deleting a D1 source's processed rows: only those whose key every sink of the stream holds.

A batch is read in processed_at order through an index on that column when the table has one
that serves it without a sort (only old rows are read), else in rowid order (key order for a
table without rowids: one pass over the table), skipping rows not processed or processed too
recently. Each row's stream key is normalised as the pipeline normalises it, every sink is
asked which keys it holds, and only the rows every sink holds are deleted. A row whose key a
sink lacks (a dead-lettered record, a sink restored from an old backup) stays, and is counted
as kept. A sink that cannot answer keeps the whole batch and ends this source's prune: a prune
is never the way a record is lost.

On a local file the batch is read, checked and deleted in one write transaction (BEGIN
IMMEDIATE), so nothing changes between the check and the delete; the lock is held for the
sinks' answer, at most `sink_timeout_seconds`. Through the REST API a transaction cannot span
requests: the delete names each row by rowid and key and repeats the age condition, and a
statement deleting more rows than it names rolls the whole batch back. Either way every
statement keeps to D1's 100 bound parameters.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sluice.ops.prune_sinks import CACHE_MIB, KeyCheck, SinkUnavailableError
from sluice.shared.cloudflare import MAX_BOUND_PARAMS, D1Client
from sluice.shared.database import quote, sqlite_connect
from sluice.shared.errors import D1Error, SourceError
from sluice.shared.records import Validator
from sluice.shared.settings import D1SourceConfig, Settings
from sluice.shared.streams import Stream
from sluice.shared.wrangler import d1_path

_OVERREACH = "sluice: a prune statement deleted more rows than it names"


@dataclass
class Tally:
    """What a prune of one target did (or, dry, would do)."""

    deleted: int = 0
    kept: int = 0  # old enough, but kept: a sink lacks the key, or could not answer
    notes: list[str] = field(default_factory=list)
    unavailable: bool = False  # a sink or store could not be reached: the prune stopped early


def d1_time(t: datetime) -> str:
    """A time as the mark capture writes `processed_at` (so text order is time order)."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Table:
    """The D1 table, local or remote: a batch of candidates, and their guarded delete."""

    def __init__(self, cfg: D1SourceConfig, stream: Stream, has_rowid: bool) -> None:
        self.table = quote(cfg.table or stream.table)
        self.key = quote(cfg.key_column)
        self.has_rowid = has_rowid
        self.keys = ", ".join(quote(k) for k in stream.key)
        self.by_age = False  # set by choose_order()
        # Each row read: [rowid,] source key, processed_at, then the stream's key columns.
        self.lead = 3 if has_rowid else 2

    def choose_order(self, plan: str) -> None:
        """Walk the old rows through an index on processed_at when the query plan of that walk
        needs no sort (it then reads only old rows); else in rowid (or key) order, one pass
        over the table, since through the index without that order every batch would sort
        every old row."""
        self.by_age = self.has_rowid and "TEMP B-TREE" not in plan and "INDEX" in plan

    def plan_sql(self) -> str:
        """The plan of a batch walked through processed_at (its parameters: cutoff, the
        keyset's two values, limit)."""
        return "EXPLAIN QUERY PLAN " + self.select_sql(("", 0), by_age=True)

    def select_sql(self, after: Any, *, by_age: bool | None = None) -> str:
        lead = f"rowid, {self.key}" if self.has_rowid else self.key
        if self.by_age if by_age is None else by_age:
            # Keyset on (processed_at, rowid): the index on processed_at holds the rowid, so
            # this is its own order.
            where = "processed_at < ?" + (
                "" if after is None else " AND (processed_at, rowid) > (?, ?)"
            )
            order = "processed_at, rowid"
        else:
            position = "rowid" if self.has_rowid else self.key
            # `+processed_at` keeps the planner on the rowid (or key) order.
            where = "+processed_at < ?" + ("" if after is None else f" AND {position} > ?")
            order = position
        return (
            f"SELECT {lead}, processed_at, {self.keys} FROM {self.table} WHERE {where}"
            f" ORDER BY {order} LIMIT ?"
        )

    def after(self, row: Sequence[Any]) -> Any:
        """Where the next batch starts: past this row."""
        if self.by_age:
            return (row[2], row[0])
        return row[0]

    def delete_statements(
        self, rows: Sequence[Sequence[Any]], cutoff: str
    ) -> list[tuple[str, list[Any], int]]:
        """(sql, params, rows it names) chunks deleting these rows, each within 100 bound
        parameters: by rowid and key (the key makes sure the rowid is still the row read), and
        only while the row is still processed before the cutoff."""
        out: list[tuple[str, list[Any], int]] = []
        width = 2 if self.has_rowid else 1
        per = (MAX_BOUND_PARAMS - 1) // width
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            marks = ", ".join("?" for _ in chunk)
            if self.has_rowid:
                where = f"rowid IN ({marks}) AND {self.key} IN ({marks})"
                params = [r[0] for r in chunk] + [r[1] for r in chunk]
            else:
                where = f"{self.key} IN ({marks})"
                params = [r[0] for r in chunk]
            out.append(
                (
                    f"DELETE FROM {self.table} WHERE {where} AND processed_at < ?",
                    [*params, cutoff],
                    len(chunk),
                )
            )
        return out


class LocalTable(_Table):
    def __init__(
        self, path: Path, cfg: D1SourceConfig, stream: Stream, busy_timeout_ms: int
    ) -> None:
        if not path.exists():
            raise SourceError(f"D1 file not found: {path}")
        # Deleting in rowid order updates the key's index at random: a large cache keeps it.
        self.conn = sqlite_connect(path, busy_timeout_ms, cache_mib=CACHE_MIB)
        rowid = True
        try:
            self.conn.execute(f"SELECT rowid FROM {quote(cfg.table or stream.table)} LIMIT 0")
        except sqlite3.OperationalError:
            rowid = False
        super().__init__(cfg, stream, rowid)

    @contextmanager
    def batch(self, write: bool) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def select(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def plan(self, sql: str, params: list[Any]) -> str:
        return " ".join(str(r[-1]) for r in self.conn.execute(sql, params))

    def delete(self, statements: list[tuple[str, list[Any], int]]) -> int:
        deleted = 0
        for sql, params, most in statements:
            changed = self.conn.execute(sql, params).rowcount
            if changed > most:
                raise SourceError(_OVERREACH)  # rolled back by batch()
            deleted += changed
        return deleted

    def close(self) -> None:
        self.conn.close()


class RemoteTable(_Table):
    def __init__(self, client: D1Client, cfg: D1SourceConfig, stream: Stream) -> None:
        self.client = client
        rowid = True
        try:
            client.query(f"SELECT rowid FROM {quote(cfg.table or stream.table)} LIMIT 0")
        except D1Error as exc:
            if exc.transient:
                raise
            rowid = False
        super().__init__(cfg, stream, rowid)

    @contextmanager
    def batch(self, write: bool) -> Iterator[None]:
        yield  # each request is its own transaction

    def select(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        # Rows come back as objects: every column gets a position alias.
        head, rest = sql.split(" FROM ", 1)
        columns = head.removeprefix("SELECT ").split(", ")
        aliased = ", ".join(f"{c} AS c{i}" for i, c in enumerate(columns))
        found = self.client.query(f"SELECT {aliased} FROM {rest}", params)
        return [tuple(r[f"c{i}"] for i in range(len(columns))) for r in found]

    def plan(self, sql: str, params: list[Any]) -> str:
        return " ".join(str(r.get("detail", "")) for r in self.client.query(sql, params))

    def delete(self, statements: list[tuple[str, list[Any], int]]) -> int:
        # One D1 batch is one transaction: after each DELETE, a statement that fails (json()
        # of text that is not JSON) when it changed more rows than it names rolls all back.
        batch: list[tuple[str, Sequence[object]]] = []
        for sql, params, most in statements:
            batch.append((sql, params))
            batch.append((f"SELECT CASE WHEN changes() > ? THEN json('{_OVERREACH}') END", [most]))
        try:
            results = self.client.batch(batch)
        except D1Error as exc:
            if "malformed JSON" in exc.message or _OVERREACH in exc.message:
                raise SourceError(_OVERREACH) from exc
            raise
        return sum(int((r.get("meta") or {}).get("changes", 0)) for r in results[0::2])

    def close(self) -> None:
        self.client.close()


def open_table(
    name: str, cfg: D1SourceConfig, stream: Stream, settings: Settings
) -> LocalTable | RemoteTable:
    if cfg.mode == "local":
        if cfg.path:
            path = Path(cfg.path)
        else:
            assert cfg.wrangler_state and cfg.database_id
            path = d1_path(Path(cfg.wrangler_state), cfg.database_id)
        return LocalTable(path, cfg, stream, settings.pipeline.sqlite_busy_timeout_ms)
    token = settings.secret(cfg.api_token_env)
    if not token:
        raise SourceError(f"remote D1 needs an API token in ${cfg.api_token_env}", source=name)
    assert cfg.account_id and cfg.database_id
    client = D1Client(
        account_id=cfg.account_id,
        database_id=cfg.database_id,
        api_token=token,
        base_url=cfg.base_url,
    )
    return RemoteTable(client, cfg, stream)


def prune_d1_source(
    name: str,
    cfg: D1SourceConfig,
    settings: Settings,
    checks: dict[str, KeyCheck],
    cutoff: datetime,
    *,
    dry_run: bool = False,
) -> Tally:
    """Delete (dry: count) the source's rows processed before `cutoff` whose key every sink of
    its stream holds. `checks`: a key checker per sink of the stream."""
    stream = settings.stream(cfg.stream)
    validator = Validator(stream)
    size = settings.retention.batch_size
    before = d1_time(cutoff)
    tally = Tally()
    table = open_table(name, cfg, stream, settings)
    try:
        lead = table.lead
        if table.has_rowid:
            table.choose_order(table.plan(table.plan_sql(), [before, "", 0, size]))
        after: Any = None
        while True:
            with table.batch(write=not dry_run):
                start = [] if after is None else list(after) if table.by_age else [after]
                rows = table.select(table.select_sql(after), [before, *start, size])
                if not rows:
                    break
                after = table.after(rows[-1])
                keys: list[list[Any]] = []
                at: list[int] = []
                for i, row in enumerate(rows):
                    key, column, _ = validator.check_key(row[lead:])
                    if column is None:  # an invalid key was dead-lettered, never written
                        keys.append(key)
                        at.append(i)
                held = set(range(len(keys)))
                try:
                    for sink in stream.sinks:
                        held &= checks[sink].present(stream, keys)
                except SinkUnavailableError as exc:
                    tally.kept += len(rows)
                    tally.unavailable = True
                    tally.notes.append(
                        f"sink {exc.context.get('sink', '?')} could not answer ({exc.message});"
                        f" a batch of {len(rows)} rows was kept and the prune stopped there"
                    )
                    break
                doomed = [rows[at[i]] for i in sorted(held)]
                tally.kept += len(rows) - len(doomed)
                if dry_run:
                    tally.deleted += len(doomed)
                elif doomed:
                    tally.deleted += table.delete(table.delete_statements(doomed, before))
            if len(rows) < size:
                break
    finally:
        table.close()
    if tally.kept and not tally.unavailable:
        tally.notes.append(
            f"{tally.kept} processed rows kept: a sink lacks their key (a dead letter, or a"
            " sink restored from an older backup); `sluice reconcile` shows which"
        )
    return tally

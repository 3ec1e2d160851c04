"""Pruning Sluice's own tables: resolved dead letters, run history (rolled up first) and expired
rows of the `cache` table. Each works in batches of `[retention] batch_size` rows, one
transaction each, so a prune never holds a lock for long.

Run history is rolled up exactly: a batch's rows are added to the daily totals
(`source_runs_daily`, `ingestion_runs_daily`) and deleted in one transaction; on PostgreSQL the
totals are computed from the rows the DELETE returns, on SQLite both statements run under the
write lock. So totals over the daily table plus the remaining rows never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text

from sluice.ops.prune_d1 import Tally
from sluice.shared.state import StateStore


def _batches(store: StateStore, sql: str, params: dict[str, Any], size: int) -> int:
    """Run a batch DELETE (returning its count) until a batch is short; the total."""
    total = 0
    while True:
        with store.write() as conn:
            n = _count(conn.execute(text(sql), {**params, "n": size}))
        total += n
        if n < size:
            return total


def _count(result: Any) -> int:
    if result.returns_rows:
        return int(result.scalar_one() or 0)
    return int(result.rowcount or 0)


def _dry_count(store: StateStore, sql: str, params: dict[str, Any]) -> int:
    with store.read() as conn:
        return int(conn.execute(text(sql), params).scalar_one() or 0)


# -- dead letters ------------------------------------------------------------------------------

_RESOLVED = "status IN ('replayed', 'discarded') AND last_failed_at < :cutoff"


def prune_letters(store: StateStore, cutoff: datetime, size: int, dry_run: bool) -> Tally:
    """Delete dead letters replayed or discarded whose latest failure is before `cutoff`;
    pending ones stay whatever their age."""
    params = {"cutoff": store.ts(cutoff)}
    if dry_run:
        n = _dry_count(store, f"SELECT count(*) FROM failed_ingestions WHERE {_RESOLVED}", params)
        return Tally(deleted=n)
    sql = (
        "DELETE FROM failed_ingestions WHERE id IN (SELECT id FROM failed_ingestions"
        f" WHERE {_RESOLVED} ORDER BY id LIMIT :n)"
    )
    return Tally(deleted=_batches(store, sql, params, size))


# -- the cache table ---------------------------------------------------------------------------


def prune_cache(store: StateStore, expired_before_ms: int, size: int, dry_run: bool) -> Tally:
    """Delete rows of `cache` whose expiry (epoch milliseconds) is before the given time."""
    params = {"t": expired_before_ms}
    if dry_run:
        return Tally(
            deleted=_dry_count(store, "SELECT count(*) FROM cache WHERE expires_at < :t", params)
        )
    sql = (
        "DELETE FROM cache WHERE cache_key IN"
        " (SELECT cache_key FROM cache WHERE expires_at < :t ORDER BY expires_at LIMIT :n)"
    )
    return Tally(deleted=_batches(store, sql, params, size))


# -- run history -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollup:
    """How one history table is rolled up: which rows are old, and the daily sums."""

    table: str
    daily: str
    key: str  # a column (or rowid) naming one row
    time: str  # the column whose UTC date is the day
    where: str  # which rows may go at all
    groups: tuple[str, ...]  # besides the day
    sums: dict[str, str]  # daily column -> SQL over a row (`d`: its duration in seconds)
    duration: tuple[str, str]  # (start, end) columns of `d`
    bucket: bool = False  # group by the latency bucket of `d` too (column `le`)

    def _d(self, dialect: str) -> str:
        start, end = self.duration
        if dialect == "postgresql":
            return f"greatest(coalesce(extract(epoch FROM {end} - {start})::float8, 0), 0)"
        return f"max(coalesce((julianday({end}) - julianday({start})) * 86400.0, 0), 0)"

    def _day(self, dialect: str) -> str:
        if dialect == "postgresql":
            return f"({self.time} AT TIME ZONE 'UTC')::date"
        return f"substr({self.time}, 1, 10)"

    @property
    def _grain(self) -> list[str]:
        """The daily table's key: the day, the groups, and the latency bucket."""
        return ["day", *self.groups, *(["le"] if self.bucket else [])]

    @property
    def _count_column(self) -> str:
        return "pages" if self.bucket else "runs"

    def _select(self, dialect: str, source: str) -> str:
        """The daily sums of the rows of `source` (a table or CTE name)."""
        le = ""
        if self.bucket:
            # Imported here: the metrics pull in status and every source kind, which a worker
            # loading the prune task does not need at start.
            from sluice.ops.metrics import BUCKETS

            cases = " ".join(f"WHEN d <= {b!r} THEN '{b!r}'" for b in BUCKETS)
            le = f", CASE {cases} ELSE '+Inf' END AS le"
        grain = ", ".join(self._grain)
        sums = ", ".join(f"sum({v})" for v in self.sums.values())
        rows = (
            f"SELECT *{le} FROM (SELECT *, {self._d(dialect)} AS d, {self._day(dialect)} AS day"
            f" FROM {source}) r0"
        )
        return f"SELECT {grain}, count(*), {sums} FROM ({rows}) r WHERE true GROUP BY {grain}"

    def _insert(self, dialect: str, source: str) -> str:
        cols = [*self._grain, self._count_column, *self.sums]
        adds = ", ".join(
            f"{c} = {self.daily}.{c} + excluded.{c}" for c in [self._count_column, *self.sums]
        )
        return (
            f"INSERT INTO {self.daily} ({', '.join(cols)}) {self._select(dialect, source)}"
            f" ON CONFLICT ({', '.join(self._grain)}) DO UPDATE SET {adds}"
        )

    def _old(self) -> str:
        return (
            f"SELECT {self.key} FROM {self.table} WHERE {self.where} AND {self.time} < :cutoff"
            f" ORDER BY {self.time}, {self.key} LIMIT :n"
        )

    def prune(self, store: StateStore, cutoff: datetime, size: int, dry_run: bool) -> Tally:
        params = {"cutoff": store.ts(cutoff)}
        if dry_run:
            sql = f"SELECT count(*) FROM {self.table} WHERE {self.where} AND {self.time} < :cutoff"
            return Tally(deleted=_dry_count(store, sql, params))
        total = 0
        while True:
            with store.write() as conn:
                if store.dialect == "postgresql":
                    # The totals are summed from exactly the rows the DELETE removed.
                    sql = (
                        f"WITH gone AS (DELETE FROM {self.table} WHERE {self.where} AND"
                        f" {self.key} IN ({self._old()}) RETURNING *), rolled AS"
                        f" ({self._insert('postgresql', 'gone')} RETURNING 1)"
                        " SELECT (SELECT count(*) FROM gone) + 0 * (SELECT count(*) FROM rolled)"
                    )
                    n = _count(conn.execute(text(sql), {**params, "n": size}))
                else:
                    mine = f"{self.where} AND {self.key} IN ({self._old()})"
                    # Under the write lock the batch's rows cannot change between the two.
                    batch = f"SELECT * FROM {self.table} WHERE {mine}"
                    conn.execute(text(self._insert("sqlite", f"({batch})")), {**params, "n": size})
                    n = _count(
                        conn.execute(
                            text(f"DELETE FROM {self.table} WHERE {mine}"),
                            {**params, "n": size},
                        )
                    )
            total += n
            if n < size:
                return Tally(deleted=total)


SOURCE_RUNS = Rollup(
    table="source_runs",
    daily="source_runs_daily",
    key="run_id",
    time="started_at",
    where="status <> 'running'",  # a run still going is not history yet
    groups=("source", "stream", "status"),
    sums={"pages": "pages", "records": "records", "seconds": "d"},
    duration=("started_at", "finished_at"),
)


def ingestion_runs(sink: str) -> Rollup:
    """The rollup of one sink's `ingestion_runs` (its own table, in its own database)."""
    columns = ("received", "inserted", "duplicates", "invalid", "updated", "unchanged")
    return Rollup(
        table="ingestion_runs",
        daily="ingestion_runs_daily",
        key="page_id",  # with the sink: one sink's table holds one row per page
        time="committed_at",
        where=f"sink = '{sink}'",
        groups=("sink", "stream", "source"),
        sums={
            **{c: c for c in columns},
            "deleted": "deleted",
            "attempts": "attempts",
            "seconds": "d",
        },
        duration=("started_at", "committed_at"),
        bucket=True,
    )

"""The Sink interface: write one page's records in one transaction, idempotently.

Implementations, one module each beside this one: postgres.py, sqlite.py and d1.py. A sink
also records the page in its `ingestion_runs` table inside the same transaction, so the counts
are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sluice.shared.database import quote
from sluice.shared.streams import Stream


@dataclass(frozen=True)
class PageMeta:
    """What the ingestion_runs row needs to know about the page being written."""

    page_id: str
    source: str
    run_id: str
    received: int
    invalid: int
    attempts: int
    started_at: datetime


@dataclass(frozen=True)
class WriteResult:
    """What a page did to a sink. Of its valid records: `inserted` (a new key), `updated` (the
    key held another version, replaced), `unchanged` (re-fetched equal to what the table holds,
    `update`/`newer` streams), `duplicates` (the rest: repeats of a key within the page, and
    under `ignore` keys the table already held); `deleted`: keys a deletion page removed."""

    inserted: int
    duplicates: int
    already_committed: bool = False  # the page had been committed by an earlier delivery
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def __add__(self, other: WriteResult) -> WriteResult:
        return WriteResult(
            self.inserted + other.inserted,
            self.duplicates + other.duplicates,
            self.already_committed and other.already_committed,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
            self.deleted + other.deleted,
        )


def page_counts(
    stream: Stream,
    meta: PageMeta,
    written: int,
    inserted: int,
    equal: int = 0,
    equal_written: int = 0,
) -> WriteResult:
    """The page's WriteResult from what the sink counted: `written` rows the statement wrote
    (inserted or replacing), `inserted` of them new keys; and, measured before the write,
    `equal` rows identical to what the table held, `equal_written` of which were still written
    (a later read of the same values: only its source order moves)."""
    valid = meta.received - meta.invalid
    updated = written - inserted - equal_written
    return WriteResult(
        inserted,
        valid - inserted - updated - equal,
        updated=updated,
        unchanged=equal,
    )


class Sink(Protocol):
    name: str

    def write(self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        """Insert rows (deduped, sorted by key; each row is the stream's columns followed by its
        source order) per the stream's conflict policy, in one transaction with the page's
        ingestion_runs row. Raises TransientSinkError (retry), RejectedBySinkError (the data
        was refused: a constraint, or a unique column other than the stream's key) or
        SinkError."""
        ...

    def delete(self, stream: Stream, keys: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        """Remove the rows of these keys (each key followed by its source order: a row written
        from a later read of the key stays), in one transaction with the ingestion_runs row."""
        ...

    def close(self) -> None: ...


ORDER_COLUMN = "sluice_order"


def with_orders(stream: Stream, rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
    """The rows as a sink writes them: the stream's columns followed by the source order, which
    is NULL (the oldest) for rows that come without one."""
    if rows and len(rows[0]) == len(stream.column_names):
        return [[*r, None] for r in rows]
    return rows


def conflict_clause(stream: Stream) -> str:
    """The ON CONFLICT clause for the stream's policy (the same text in both dialects), on the
    stream's key only: a conflict on any other unique column is the database refusing the
    record, not a duplicate.

    Rows carry their source order (`sluice_order`), so when two reads of a key race to a sink,
    every sink keeps the same one whatever the arrival order:
    - `ignore`: the first read (an earlier read arriving later replaces the later one);
    - `update`: the last read (a later read equal to the row held still moves its order, so
      an older read arriving after it cannot win);
    - `newer`: the higher version column.
    A row written before orders existed (NULL) counts as the oldest."""
    t, o = quote(stream.table), quote(ORDER_COLUMN)
    key = ", ".join(quote(k) for k in stream.key)
    values = [quote(c) for c in stream.column_names if c not in stream.key]
    sets = ", ".join(f"{c} = excluded.{c}" for c in [*values, o])
    clause = f"ON CONFLICT ({key}) DO UPDATE SET {sets} WHERE "
    if stream.conflict == "ignore":
        return clause + f"excluded.{o} < {t}.{o}"
    if stream.conflict == "update":
        return clause + later(f"excluded.{o}", f"{t}.{o}")
    assert stream.version_column is not None
    v = quote(stream.version_column)
    return clause + f"{t}.{v} IS NULL OR excluded.{v} > {t}.{v}"


def later(arriving: str, held: str) -> str:
    """SQL: the arriving row's source order is after the held row's (NULL: unknown, which
    counts as the oldest held, and as later when arriving)."""
    return f"({held} IS NULL OR {arriving} IS NULL OR {arriving} > {held})"


def equal_rows_sql(stream: Stream, held: str, arriving: str, dialect: str) -> str:
    """SQL counting the arriving rows equal, column by column, to the row the table holds for
    their key, and how many of those the update policy will still write (a later order):
    `SELECT count(*), <written> FROM … WHERE …`, completed by the caller's FROM/JOIN."""
    same = "IS NOT DISTINCT FROM" if dialect == "postgresql" else "IS"
    values = [quote(c) for c in stream.column_names if c not in stream.key]
    equal = " AND ".join(f"{held}.{c} {same} {arriving}.{c}" for c in values) or "1 = 1"
    o = quote(ORDER_COLUMN)
    written = (
        f"sum(CASE WHEN {later(f'{arriving}.{o}', f'{held}.{o}')} THEN 1 ELSE 0 END)"
        if stream.conflict == "update"
        else "0"
    )
    return f"SELECT count(*) AS n, coalesce({written}, 0) AS w {{source}} WHERE {equal}"

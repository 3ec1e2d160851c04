"""The Sink interface: write one page's records in one transaction, idempotently.

Implementations: shared/postgres_sink.py and shared/sqlite_sink.py. A sink also records the page
in its `ingestion_runs` table inside the same transaction, so the counts are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shared.streams import Stream


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
    inserted: int
    duplicates: int
    already_committed: bool = False  # the page had been committed by an earlier delivery


class Sink(Protocol):
    name: str

    def write(self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        """Insert rows (deduped, sorted by key) per the stream's conflict policy, in one
        transaction with the page's ingestion_runs row. Raises TransientSinkError (retry),
        RejectedBySinkError (the data was refused) or SinkError."""
        ...

    def close(self) -> None: ...


def quote(name: str) -> str:
    """An SQL identifier, quoted the same way in PostgreSQL and SQLite."""
    return '"' + name.replace('"', '""') + '"'


def conflict_clause(stream: Stream) -> str:
    """The ON CONFLICT clause for the stream's policy; the same text in both dialects.

    `ignore` has no target, so it arbitrates every unique index (limits.md F3); `update` and
    `newer` name the key, which must then be the table's only unique key besides it."""
    if stream.conflict == "ignore":
        return "ON CONFLICT DO NOTHING"
    key = ", ".join(quote(k) for k in stream.key)
    updates = ", ".join(
        f"{quote(c)} = excluded.{quote(c)}" for c in stream.column_names if c not in stream.key
    )
    clause = f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    if stream.conflict == "newer":
        assert stream.version_column is not None
        t, v = quote(stream.table), quote(stream.version_column)
        clause += f" WHERE {t}.{v} IS NULL OR excluded.{v} > {t}.{v}"
    return clause

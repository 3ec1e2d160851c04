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

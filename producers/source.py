"""The Source interface: where records come from.

A source reads pages of records after a resume point and, once every sink has committed a page
(and every dead letter of it is stored), acknowledges it (D1: sets processed_at on its rows; an
HTTP source: moves its cursor). Acknowledging twice must be harmless.

What a source reads but cannot turn into a record (a value that is not UTF-8, a kline that is
not an array) travels in the page as a `SourceReject`: it becomes a dead letter, and the page is
acknowledged only once that letter is stored, so nothing read is ever dropped.

A source may also report, after `pages` returns:
- `anomalies`: what the source did wrong that the run worked around (the run still succeeds);
- `failures`: parts of the run that failed for good (one partition of an HTTP source); the other
  parts went on, and the run is recorded as `partial`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sluice.shared.streams import Stream


@dataclass(frozen=True)
class SourceReject:
    """An item read from the source that is not a record: kept whole as a dead letter."""

    key: str  # what names the item: its key, or partition and time
    item: Any  # the item as read (a JSON value, bytes, a row), msgpack-serialisable
    error: str  # what is wrong, naming the field
    error_class: str = "SourceRecordError"
    stream: str | None = None  # the stream it was meant for; None: the page's


@dataclass
class SourcePage:
    rows: Sequence[Sequence[Any]]  # in the stream's column order
    ack: Any  # what `acknowledge` needs (msgpack-serialisable)
    last_key: Any  # where the next page starts (keyset)
    # The page's stream when the source feeds several (a KV namespace); None: `source.stream`.
    stream: str | None = None
    # Items of this page that are not records: dead letters, stored before the acknowledgement.
    rejected: list[SourceReject] = field(default_factory=list)
    # "delete": the rows are keys (the stream's key columns) to remove from every sink.
    op: str = "upsert"
    # The rows' source order when the source has a stable one (a D1 table's rowids): the same
    # row read twice then has the same order. None: the order they are read in.
    orders: list[int] | None = None


class Source(Protocol):
    name: str
    stream: Stream  # the stream of pages that name none (SourcePage.stream)

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]: ...

    def acknowledge(self, ack: Any) -> None: ...

    def close(self) -> None: ...

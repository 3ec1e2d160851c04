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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from sluice.shared.errors import MissingSecretError
from sluice.shared.state import StateStore
from sluice.shared.streams import Stream

T = TypeVar("T")

# How a source's lag is measured (SourceStatus.lag_from).
LagBasis = Literal["stream", "cursors"]


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


@dataclass(kw_only=True)
class SourceStatus:
    """What a source knows of its own progress, for `sluice status` and the metrics: the facts
    only its kind can give. Each kind subclasses it with its own facts. A fact that could not be
    read is None, and why is under `errors`, by the fact's name, so one unreadable fact leaves
    the others."""

    # How the source's lag is measured: "stream" (now minus the newest event time committed for
    # its stream), "cursors" (now minus its partition cursor furthest behind: sources that share
    # a stream), or None when the kind has no lag (a one-time migration).
    lag_from: LagBasis | None = None
    # Per partition, the time before which every sink has committed everything.
    cursors: dict[str, datetime] | None = None
    # Rows the source holds and has not processed yet, when the kind can count them cheaply.
    unprocessed: int | None = None
    # The time of the oldest item still to process: a D1 row's event time, an HTTP source's
    # cursor furthest behind, the start of a KV migration still running. None when unknown,
    # or when nothing waits (`caught_up`).
    oldest_unprocessed: datetime | None = None
    caught_up: bool = False
    errors: dict[str, str] = field(default_factory=dict)
    # Facts this process cannot know (a remote database whose API token is not in its
    # environment), by name, with why: shown, but not a failure of the source.
    unknown: dict[str, str] = field(default_factory=dict)

    def read(self, fact: str, fn: Callable[[], T]) -> T | None:
        """`fn()`, or None with the error recorded under `fact`."""
        try:
            return fn()
        except MissingSecretError as exc:
            self.unknown[fact] = exc.message
            return None
        except Exception as exc:
            self.errors[fact] = f"{type(exc).__name__}: {exc}".strip()
            return None

    def backlog_age(self, now: datetime) -> float | None:
        """Seconds since the oldest item still to process (0 when caught up; never negative,
        whatever the source's clock; None when unknown)."""
        if self.caught_up:
            return 0.0
        if self.oldest_unprocessed is None:
            return None
        return round(max(0.0, (now - self.oldest_unprocessed).total_seconds()), 1)

    def facts(self) -> dict[str, Any]:
        """The kind's own facts as JSON values, under the keys `sluice status --json` shows."""
        return {}

    def summary(self) -> str | None:
        """What the status screen adds after the source's last run, in a few words (None:
        nothing beyond the common columns)."""
        return None


class Source(Protocol):
    name: str
    stream: Stream  # the stream of pages that name none (SourcePage.stream)

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]: ...

    def acknowledge(self, ack: Any) -> None: ...

    def status(self, state: StateStore | None) -> SourceStatus:
        """Its own facts, reading its progress from `state` (None: the state store cannot be
        read, and what lives there is unknown)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Snapshotting(Protocol):
    """A source that can be read whole without changing anything: `sluice reconcile` compares
    every sink with its snapshot. (An HTTP API has no such whole to read.)"""

    @property
    def capture(self) -> str | None:
        """How the source finds changes, when its kind has a choice (the report names it)."""
        ...

    @property
    def keeps_deleted(self) -> bool:
        """Whether the sinks keep rows the source has since deleted: such keys are expected in
        the sinks, not a mismatch."""
        ...

    def snapshot(self) -> Iterator[tuple[str, list[Any]]]:
        """(stream, row) for every record the source holds, in the stream's column order."""
        ...

    def unknown_columns(self, stream: Stream, row: Sequence[Any]) -> set[str]:
        """The columns of a row of the last snapshot that the source cannot know (filled from
        a clock when the data has no such value): compared with no sink."""
        ...

    def skipped_columns(self, stream: str) -> str | None:
        """What the report says is skipped for `stream`, and why (None: nothing)."""
        ...

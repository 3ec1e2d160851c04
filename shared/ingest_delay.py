"""Ingest delay: from a record's own time to the commit of its page in a sink, as a histogram.

The consumer observes it where a sink commits a page, and keeps the counts in Redis (one hash,
`HINCRBY` per bucket), so any number of worker processes add to the same counts and any
`sluice serve` reads them (ops/metrics.py, `sluice_ingest_delay_seconds`). A page delivered
again after its commit adds nothing: the sink reports it as already committed. The counts are
counters: they live as long as Redis keeps its data (a flushed Redis reads as a counter reset).

A record's time is its stream's first timestamp column (its event time); a stream without one,
and deletion pages, are not observed.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from sluice.shared.streams import Stream

KEY = "sluice:ingest_delay"
# Upper bounds, seconds: a live pipeline commits within seconds to minutes; a backfill or a
# source catching up commits records hours to a year old.
BUCKETS: tuple[float, ...] = (
    1,
    5,
    15,
    60,
    300,
    900,
    3600,
    6 * 3600,
    86400,
    7 * 86400,
    30 * 86400,
    365 * 86400,
)
_SEP = "\x1f"  # between stream, sink and field in a hash field's name


def time_index(stream: Stream) -> int | None:
    """The position of the stream's first timestamp column in its rows."""
    return next((i for i, c in enumerate(stream.columns) if c.type == "timestamp"), None)


@dataclass
class Observed:
    """One page's delays, bucketed: `counts[i]` delays in (BUCKETS[i-1], BUCKETS[i]], and the
    last one above every bound."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)  # a source clock ahead of ours is no negative delay
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1


def observe(stream: Stream, rows: Iterable[Sequence[Any]], committed: datetime) -> Observed:
    """The delays of `rows` (validated: a timestamp is UTC ISO-8601 text) committed at
    `committed`."""
    out = Observed()
    at = time_index(stream)
    if at is None:
        return out
    now = committed.timestamp()
    for row in rows:
        value = row[at]
        if isinstance(value, str):
            try:
                t = datetime.fromisoformat(value)
            except ValueError:
                continue
            if t.tzinfo is None:
                t = t.replace(tzinfo=UTC)
            out.add(now - t.timestamp())
    return out


def record(client: redis.Redis, stream: str, sink: str, seen: Observed) -> None:
    """Add one page's delays to the shared counts, in one round trip."""
    if not seen.n:
        return
    pipe = client.pipeline(transaction=True)
    prefix = f"{stream}{_SEP}{sink}{_SEP}"
    for i, n in enumerate(seen.counts):
        if n:
            pipe.hincrby(KEY, f"{prefix}{i}", n)
    pipe.hincrby(KEY, f"{prefix}count", seen.n)
    pipe.hincrbyfloat(KEY, f"{prefix}sum", seen.total)
    pipe.execute()


@dataclass
class Histogram:
    """The counts of one stream and sink, as recorded: per bucket (not cumulative), count, sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    count: int = 0
    total: float = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, records at or below it), ending with +Inf."""
        out, running = [], 0
        for bound, n in zip(BUCKETS, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


def read(client: redis.Redis) -> dict[tuple[str, str], Histogram]:
    """Every (stream, sink)'s counts."""
    out: dict[tuple[str, str], Histogram] = {}
    for raw_name, raw_value in client.hgetall(KEY).items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
        parts = name.split(_SEP)
        if len(parts) != 3:
            continue
        stream, sink, what = parts
        h = out.setdefault((stream, sink), Histogram())
        if what == "count":
            h.count = int(value)
        elif what == "sum":
            h.total = float(value)
        elif what.isdigit() and int(what) < len(h.counts):
            h.counts[int(what)] += int(value)
    return out

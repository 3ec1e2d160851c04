"""What every HTTP API source shares: partitions, windows, the lookback buffer and the cursor.

A run splits each partition's time from its resume point to now into windows the API serves in
one go (Binance: `limit` bars; CryptoCompare: `limit + 1` candles; CoinGecko: <= 90 days; ACE: a
configured span) and yields one page per window, taking windows from the partitions in turn so
one long backlog does not starve the others. The resume point of a partition is:
- the end of its newest window still in flight (run_source passes them), so a run never
  enqueues a window again while it is on its way;
- otherwise its cursor minus the lookback buffer (late data is picked up);
- otherwise the configured `start` (or `initial_days` ago).
Only closed periods are fetched (a candle still open would be stored half-made and, once the
cursor passed it, never corrected). The cursor moves on acknowledgement only, after every sink
committed the window (producers/cursors.py). A window with no data advances it at once.

What a window's answer can hold besides records:
- items that cannot be placed (a kline that is not an array, a time that is not a number): they
  travel in the page as `SourceReject`s and become dead letters; a page of nothing else is still
  enqueued, and the cursor moves once the letters are stored;
- times outside the window asked for (by more than a period): the answer is not trusted (often
  seconds sent for milliseconds). The window is not stored, the cursor stays, the partition stops
  for this run and is listed in `failures`;
- a permanent error (an unknown symbol's 400, an oversized answer): the same, for that partition
  only. Transient errors (after the client's retries) and bans end the run.

A run stops early, and not as a failure, once it has made `max_calls_per_run` calls or run
`max_run_seconds` (checked between windows, empty ones included); the next run continues from the
cursors. If every partition failed before any window went through, the run fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from sluice.producers.cursors import CursorStore, format_cursor, parse_cursor
from sluice.producers.http_client import HttpApi
from sluice.producers.rate_limit import Budget, SharedRateLimiter
from sluice.producers.source import LagBasis, SourcePage, SourceReject, SourceStatus
from sluice.shared.database import broker_url
from sluice.shared.errors import HttpSourceError, SourceError, TransientSourceError
from sluice.shared.redis_client import open_redis
from sluice.shared.settings import HttpSourceConfig, Settings
from sluice.shared.state import StateStore, open_state
from sluice.shared.streams import Stream

log = logging.getLogger("sluice.http_source")

Row = list[Any]


def iso_utc(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def floor_time(t: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((t - epoch) // step) * step


def whole_number(value: Any) -> int | None:
    """An epoch time as the APIs send it: an int, or a number without a fraction (its literal
    text when parsed with exact numbers). None for anything else (null, a word, a bool)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(f) if f.is_integer() else None


def _epoch_text(seconds: float) -> str:
    try:
        return iso_utc(datetime.fromtimestamp(seconds, UTC))
    except (ValueError, OverflowError, OSError):
        return "out of range"


@dataclass(kw_only=True)
class HttpStatus(SourceStatus):
    """An HTTP source's own facts: its cursor per partition. Several sources may feed one
    stream, so its lag is taken from its own cursors, not from the stream."""

    lag_from: LagBasis | None = "cursors"

    def facts(self) -> dict[str, Any]:
        if self.cursors is None:
            return {"cursors": None}
        return {"cursors": {p: c.isoformat() for p, c in sorted(self.cursors.items())}}


@dataclass
class WindowRead:
    """What one window's answer(s) gave."""

    rows: list[Row]
    complete_until: datetime  # the window's end, or earlier when the API stopped paging
    rejected: list[SourceReject] = field(default_factory=list)


class HttpSource:
    """Base of the API adapters. Subclasses set `api`, and implement `partitions`, `window`,
    `closed_until` and `fetch`."""

    api = "http"
    resumes_per_partition = True  # run_source passes every in-flight window, not one max key
    http: HttpApi  # set by each adapter

    def __init__(self, name: str, cfg: HttpSourceConfig, stream: Stream, settings: Settings):
        self.name = name
        self.cfg = cfg
        self.stream = stream
        self.settings = settings
        self.now: Callable[[], datetime] = _utcnow  # tests move the clock
        self.anomalies: list[str] = []
        self.failures: list[str] = []  # partitions that failed for good in the last run
        self.stopped_early: str | None = None  # the bound that ended the last run, if one did

    # -- adapter hooks ----------------------------------------------------------------------

    def partitions(self) -> list[str]:
        raise NotImplementedError

    def window(self) -> timedelta:
        """The longest span one window may cover."""
        raise NotImplementedError

    def closed_until(self, now: datetime) -> datetime:
        """The end (exclusive) of the newest period that is complete at `now`."""
        return now

    def read_window(self, partition: str, start: datetime, end: datetime) -> WindowRead:
        """Rows with period start in [start, end), in stream column order, deduped; the items
        that are not records; and how far the window is complete: `end`, or earlier when the
        API stopped paging part-way (ACE's cursor that does not advance). A window cut short
        ends its partition's run there; its acknowledgement moves the cursor only that far."""
        raise NotImplementedError

    def fetch_window(
        self, partition: str, start: datetime, end: datetime
    ) -> tuple[list[Row], datetime]:
        """`read_window` for callers that cannot carry rejected items: refuses a window that
        has some rather than drop them."""
        got = self.read_window(partition, start, end)
        if got.rejected:
            raise HttpSourceError(
                f"{len(got.rejected)} item(s) of the answer are not records (first: "
                f"{got.rejected[0].error}); this caller cannot keep them as dead letters, so "
                f"the window {iso_utc(start)}..{iso_utc(end)} is refused rather than stored "
                "without them",
                where={"source": self.name, "partition": partition},
            )
        return got.rows, got.complete_until

    def fetch(self, partition: str, start: datetime, end: datetime) -> list[Row]:
        """The rows of [start, end) (see `fetch_window`)."""
        return self.fetch_window(partition, start, end)[0]

    def anomaly(self, message: str, **where: object) -> None:
        """Something the API did wrong that the run worked around: logged, and recorded in the
        run's `error` (source_runs) though the run succeeds."""
        detail = ", ".join(f"{k}={v}" for k, v in where.items())
        text = f"{message} ({detail})" if detail else message
        log.error("source %s: %s", self.name, text)
        self.anomalies.append(text)

    def reject(self, partition: str, item: Any, why: str, where: str) -> SourceReject:
        """A dead letter for an item of the answer that is not a record. Keyed by its content, so
        reading it again (the lookback buffer, a rerun) finds the same letter."""
        text = json.dumps(item, sort_keys=True, default=str)
        key = f"{partition}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        return SourceReject(key, item, f"{self.api} {where} of {partition}: {why}")

    def check_times(
        self,
        partition: str,
        lo: datetime,
        hi: datetime,
        stamps: Sequence[int],
        unit: float,
        what: str,
    ) -> None:
        """Raise a permanent error when any of `stamps` (epoch times in units of `unit` seconds)
        lies more than one period outside [lo, hi], the span the request asked for. A period's
        slack allows an edge point (a bar containing the start, CoinGecko's point at `to`);
        times in the wrong unit (seconds for milliseconds) are off by far more."""
        slack = self.period().total_seconds()
        first, last = lo.timestamp() - slack, hi.timestamp() + slack
        bad = [v for v in stamps if not first <= v * unit <= last]
        if not bad:
            return
        shown = ", ".join(f"{v} (read as {_epoch_text(v * unit)})" for v in bad[:3])
        raise HttpSourceError(
            f"{self.api} answered {len(bad)} of {len(stamps)} {what} outside the span asked for "
            f"({iso_utc(lo)}..{iso_utc(hi)}): {shown}. Times in another unit (seconds for "
            "milliseconds)? The window is not stored and the cursor stays; check that base_url "
            "is the real API",
            where={"source": self.name, "partition": partition},
        )

    # -- shared machinery -------------------------------------------------------------------

    def secret(self) -> str | None:
        return self.settings.secret(self.cfg.api_key_env) if self.cfg.api_key_env else None

    @cached_property
    def redis(self) -> redis.Redis:
        url = self.settings.env.get("SLUICE_REDIS_URL") or broker_url(self.settings)
        return open_redis(
            url, self.settings.broker_master, socket_timeout=30, socket_connect_timeout=10
        )

    @cached_property
    def limiter(self) -> SharedRateLimiter:
        budgets = [Budget(b.limit, b.per) for b in self.cfg.rate_limits]
        return SharedRateLimiter(self.redis, self.api, budgets)

    def make_api(self, headers: dict[str, str] | None = None, **kwargs: Any) -> HttpApi:
        key = self.secret()
        return HttpApi(
            api=self.api,
            base_url=self.cfg.base_url,
            limiter=self.limiter,
            headers=headers,
            secrets=(key,) if key else (),
            timeout=(self.cfg.connect_timeout, self.cfg.read_timeout),
            total_timeout=self.cfg.total_timeout,
            max_response_bytes=self.cfg.max_response_bytes,
            max_attempts=self.cfg.max_attempts,
            max_wait=self.cfg.max_wait_seconds,
            rate_limit_fallback=self.cfg.rate_limit_fallback_seconds,
            **kwargs,
        )

    @cached_property
    def engine(self) -> StateStore:
        return open_state(self.settings)

    @cached_property
    def cursors(self) -> CursorStore:
        return CursorStore(self.engine)

    def initial_start(self) -> datetime:
        if self.cfg.start is not None:
            t = datetime.fromisoformat(self.cfg.start)
            return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
        return self.now() - timedelta(days=self.cfg.initial_days)

    def resume_points(self, after: Any | None) -> dict[str, tuple[datetime, bool]]:
        """Per partition: where this run starts, and whether that is the first window ever."""
        in_flight: dict[str, datetime] = {}
        for item in after or []:
            partition, end = item[0], parse_cursor(item[1])
            if partition not in in_flight or end > in_flight[partition]:
                in_flight[partition] = end
        cursors = self.cursors.get_all(self.name)
        lookback = timedelta(seconds=self.cfg.lookback_seconds)
        out: dict[str, tuple[datetime, bool]] = {}
        for p in self.partitions():
            if p in in_flight:
                out[p] = (in_flight[p], False)
            elif p in cursors:
                out[p] = (cursors[p] - lookback, False)
            else:
                out[p] = (self.initial_start(), True)
        return out

    def period(self) -> timedelta:
        """The grid the API's periods start on (a bar, a candle, CoinGecko's hour)."""
        return timedelta(seconds=1)

    def windows(
        self, start: datetime, until: datetime, first: bool = False
    ) -> Iterator[tuple[datetime, datetime, bool]]:
        """[start, until) in windows of at most `window()` counted from the period `start` is
        in (fetches floor their start to it), so windows after the first start on the grid: an
        unaligned start (a cursor minus the lookback, a backfill's --from) never makes a window
        span more periods than one call serves (CoinGecko answers daily points beyond 90 days)."""
        step = self.window()
        lo = floor_time(start, self.period())
        while start < until:
            end = min(lo + step, until)
            if end <= start:  # a window shorter than a period
                end = min(start + step, until)
            yield start, end, first
            start, lo, first = end, end, False

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]:
        until = self.closed_until(self.now())
        plans = {
            p: self.windows(start, until, first)
            for p, (start, first) in self.resume_points(after).items()
        }
        self.failures, self.stopped_early = [], None
        failed: set[str] = set()
        done = 0  # windows read whole: enqueued, or empty and acknowledged
        started, calls = time.monotonic(), self.http.calls
        produced = 0
        while plans and produced < max_pages:
            for partition in list(plans):
                if self._bound_reached(started, calls):
                    return
                w = next(plans[partition], None)
                if w is None:
                    del plans[partition]
                    continue
                start, end, first = w
                try:
                    got = self.read_window(partition, start, end)
                except SourceError as exc:
                    if exc.transient:
                        raise  # the next run tries again; a ban stops every partition anyway
                    del plans[partition]  # the cursor stays; the other partitions go on
                    failed.add(partition)
                    self._fail(partition, start, end, exc)
                    continue
                if got.complete_until < end:
                    del plans[partition]  # later windows would leave a gap before them
                    end = got.complete_until
                    if end <= start:
                        continue  # nothing complete: the cursor stays, the anomaly is recorded
                ack = {
                    "partition": partition,
                    "start": format_cursor(start),
                    "end": format_cursor(end),
                    "first": first,
                }
                done += 1
                if not got.rows and not got.rejected:
                    self.acknowledge(ack)  # nothing to commit: the cursor may move now
                    continue
                produced += 1
                yield SourcePage(
                    rows=got.rows,
                    ack=ack,
                    last_key=[partition, ack["end"]],
                    rejected=got.rejected,
                )
                if produced >= max_pages:
                    return
        if failed and failed >= set(self.partitions()) and not done:  # nothing went through
            raise HttpSourceError(
                "every partition failed: " + "; ".join(self.failures),
                where={"source": self.name},
            )

    def _fail(self, partition: str, start: datetime, end: datetime, exc: SourceError) -> None:
        text = f"{partition} (window {iso_utc(start)}..{iso_utc(end)}): {exc}"
        log.error("source %s: partition failed, the others go on: %s", self.name, text)
        self.failures.append(text)

    def _bound_reached(self, started: float, calls: int) -> bool:
        made, spent = self.http.calls - calls, time.monotonic() - started
        if made >= self.cfg.max_calls_per_run:
            self.stopped_early = f"max_calls_per_run ({made} calls)"
        elif spent >= self.cfg.max_run_seconds:
            self.stopped_early = f"max_run_seconds ({spent:.1f}s)"
        else:
            return False
        log.info(
            "source %s: run stopped at %s; the next run continues from the cursors",
            self.name,
            self.stopped_early,
        )
        return True

    def acknowledge(self, ack: Any) -> None:
        try:
            self.cursors.advance(
                self.name,
                str(ack["partition"]),
                parse_cursor(ack["start"]),
                parse_cursor(ack["end"]),
                bool(ack.get("first")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise SourceError(f"malformed acknowledgement: {exc}", source=self.name) from exc
        except SQLAlchemyError as exc:  # the state database is down: retried by the ack task
            raise TransientSourceError(
                f"could not store the cursor: {type(exc).__name__}", source=self.name
            ) from exc

    def status(self, state: StateStore | None) -> HttpStatus:
        """The cursor of each partition (`source_progress`), read from `state`."""
        out = HttpStatus()
        if state is not None:
            out.cursors = out.read("cursor", lambda: CursorStore(state).get_all(self.name))
        if out.cursors:
            # What is still to read starts at the cursor furthest behind.
            out.oldest_unprocessed = min(out.cursors.values())
        return out

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()

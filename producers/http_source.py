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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import redis
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from producers.cursors import CursorStore, format_cursor, parse_cursor
from producers.http_client import HttpApi
from producers.rate_limit import Budget, SharedRateLimiter
from producers.source import SourcePage
from shared.database import broker_url, postgres_engine, postgres_url
from shared.errors import SourceError, TransientSourceError
from shared.settings import HttpSourceConfig, Settings
from shared.streams import Stream

log = logging.getLogger("sluice.http_source")

Row = list[Any]


def iso_utc(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def floor_time(t: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((t - epoch) // step) * step


class HttpSource:
    """Base of the API adapters. Subclasses set `api`, and implement `partitions`, `window`,
    `closed_until` and `fetch`."""

    api = "http"
    resumes_per_partition = True  # run_source passes every in-flight window, not one max key

    def __init__(self, name: str, cfg: HttpSourceConfig, stream: Stream, settings: Settings):
        self.name = name
        self.cfg = cfg
        self.stream = stream
        self.settings = settings
        self.now: Callable[[], datetime] = _utcnow  # tests move the clock
        self.anomalies: list[str] = []

    # -- adapter hooks ----------------------------------------------------------------------

    def partitions(self) -> list[str]:
        raise NotImplementedError

    def window(self) -> timedelta:
        """The longest span one window may cover."""
        raise NotImplementedError

    def closed_until(self, now: datetime) -> datetime:
        """The end (exclusive) of the newest period that is complete at `now`."""
        return now

    def fetch(self, partition: str, start: datetime, end: datetime) -> list[Row]:
        """Rows with period start in [start, end), in stream column order, deduped."""
        raise NotImplementedError

    def fetch_window(
        self, partition: str, start: datetime, end: datetime
    ) -> tuple[list[Row], datetime]:
        """Rows of the window and how far they are complete: `end`, or earlier when the API
        stopped paging part-way (ACE's cursor that does not advance). A window cut short ends
        its partition's run there; its acknowledgement moves the cursor only that far."""
        return self.fetch(partition, start, end), end

    def anomaly(self, message: str, **where: object) -> None:
        """Something the API did wrong that the run worked around: logged, and recorded in the
        run's `error` (source_runs) though the run succeeds."""
        detail = ", ".join(f"{k}={v}" for k, v in where.items())
        text = f"{message} ({detail})" if detail else message
        log.error("source %s: %s", self.name, text)
        self.anomalies.append(text)

    # -- shared machinery -------------------------------------------------------------------

    def secret(self) -> str | None:
        return self.settings.secret(self.cfg.api_key_env) if self.cfg.api_key_env else None

    @cached_property
    def redis(self) -> redis.Redis:
        url = self.settings.env.get("SLUICE_REDIS_URL") or broker_url(self.settings)
        return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)

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
            max_attempts=self.cfg.max_attempts,
            max_wait=self.cfg.max_wait_seconds,
            rate_limit_fallback=self.cfg.rate_limit_fallback_seconds,
            **kwargs,
        )

    @cached_property
    def engine(self) -> Engine:
        return postgres_engine(postgres_url(self.settings))

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
        produced = 0
        while plans and produced < max_pages:
            for partition in list(plans):
                w = next(plans[partition], None)
                if w is None:
                    del plans[partition]
                    continue
                start, end, first = w
                rows, complete_until = self.fetch_window(partition, start, end)
                if complete_until < end:
                    del plans[partition]  # later windows would leave a gap before them
                    end = complete_until
                    if end <= start:
                        continue  # nothing complete: the cursor stays, the anomaly is recorded
                ack = {
                    "partition": partition,
                    "start": format_cursor(start),
                    "end": format_cursor(end),
                    "first": first,
                }
                if not rows:
                    self.acknowledge(ack)  # nothing to commit: the cursor may move now
                    continue
                produced += 1
                yield SourcePage(rows=rows, ack=ack, last_key=[partition, ack["end"]])
                if produced >= max_pages:
                    return

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

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
        if "redis" in self.__dict__:
            self.redis.close()

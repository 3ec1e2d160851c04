"""Binance spot klines: `GET /api/v3/klines` per symbol into historical_prices
(https://developers.binance.com/docs/binance-spot-api-docs/rest-api/market-data-endpoints).

A window is `limit` bars from its start: one call (weight 2) with startTime and endTime (the
last millisecond of the window); a full answer that stops short of the window's end (repeated
bars took room) is followed by one from the bar after its last. Times are sent in milliseconds
and the `X-MBX-TIME-UNIT` header is never sent, so times come back in milliseconds: an answer
with open times far outside the window asked for (seconds, microseconds) fails the window rather
than being taken for "no data". Repeated bars are dropped. The `x-mbx-used-weight-1m` header
counts what the whole IP used this minute, including clients we do not see: near the limit every
producer pauses until the minute ends.

Prices and volumes are decimal strings, passed on exactly as sent; a null stays null (the
record's validation names a missing required field). A kline that cannot be placed (not an
array, too short, an open time that is not a number) becomes a dead letter; the rest of the
answer goes on.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from sluice.producers.http_client import Retry
from sluice.producers.http_source import (
    HttpSource,
    Row,
    WindowRead,
    floor_time,
    iso_utc,
    whole_number,
)
from sluice.producers.source import SourceReject
from sluice.shared.errors import HttpSourceError
from sluice.shared.settings import BinanceSourceConfig, Settings
from sluice.shared.streams import Stream

KLINES_WEIGHT = 2
PUBLISHED_WEIGHT_PER_MINUTE = 6000
PAUSE_AT = 0.9  # of the published weight
KLINE_FIELDS = 9  # open time ... number of trades: what a row needs

INTERVAL_SECONDS = {
    "1s": 1, "1m": 60, "3m": 180, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "2h": 7200,
    "4h": 14400, "6h": 21600, "8h": 28800, "12h": 43200, "1d": 86400, "3d": 259200,
    "1w": 604800,
}  # fmt: skip


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _klines_shape(body: Any) -> Retry | None:
    # A wrong shape (an object where the array belongs) is a server or proxy fault: retry. A
    # kline of the wrong shape inside the array is a dead letter of its own.
    if not isinstance(body, list):
        return Retry(f"klines body is not an array: {str(body)[:100]}")
    return None


def _open_time(k: Any) -> tuple[int | None, str]:
    """The kline's open time (ms), or None and why it cannot be placed."""
    if not isinstance(k, list):
        return None, f"kline is a JSON {type(k).__name__}, not an array"
    if len(k) < KLINE_FIELDS:
        return None, f"kline has {len(k)} fields, expected 12"
    t = whole_number(k[0])
    if t is None:
        return None, f"open time {str(k[0])[:40]!r} is not a number"
    return t, ""


class BinanceSource(HttpSource):
    api = "binance"
    cfg: BinanceSourceConfig

    def __init__(self, name: str, cfg: BinanceSourceConfig, stream: Stream, settings: Settings):
        super().__init__(name, cfg, stream, settings)
        self.step = timedelta(seconds=INTERVAL_SECONDS[cfg.interval])
        key = self.secret()
        self.http = self.make_api(
            headers={"X-MBX-APIKEY": key} if key else None, on_response=self._watch_weight
        )

    def _watch_weight(self, response: requests.Response) -> None:
        used = response.headers.get("x-mbx-used-weight-1m")
        if used is None:
            return
        try:
            weight = int(used)
        except ValueError:
            return
        if weight >= PAUSE_AT * PUBLISHED_WEIGHT_PER_MINUTE:
            # Binance counts per wall-clock minute: the budget comes back when the minute ends.
            self.limiter.pause(60 - time.time() % 60)

    def partitions(self) -> list[str]:
        return list(self.cfg.symbols)

    def period(self) -> timedelta:
        return self.step

    def window(self) -> timedelta:
        return self.step * self.cfg.limit

    def closed_until(self, now: datetime) -> datetime:
        return floor_time(now, self.step)

    def initial_start(self) -> datetime:
        return floor_time(super().initial_start(), self.step)

    def read_window(self, partition: str, start: datetime, end: datetime) -> WindowRead:
        start = floor_time(start, self.step)  # bars open on interval boundaries
        lo, hi = _ms(start), _ms(end)
        step_ms = int(self.step.total_seconds() * 1000)
        rows: dict[int, Row] = {}
        rejected: list[SourceReject] = []
        since = lo
        # A window is `limit` bars, so one call normally covers it; a full answer that ends
        # before the window does (repeated bars took room) continues from the bar after its
        # last, until a short answer or the window's end.
        while since < hi:
            body = self._klines(partition, since, hi)
            placed: list[tuple[int, list[Any]]] = []
            for i, k in enumerate(body):
                open_ms, why = _open_time(k)
                if open_ms is None:
                    where = f"kline #{i} of the answer from {since}"
                    rejected.append(self.reject(partition, k, why, where))
                else:
                    placed.append((open_ms, k))
            when = datetime.fromtimestamp(since / 1000, UTC)
            self.check_times(partition, when, end, [t for t, _ in placed], 0.001, "klines")
            for open_ms, k in placed:
                if lo <= open_ms < hi:
                    rows[open_ms] = self._row(partition, open_ms, k)
            if len(body) < self.cfg.limit or not placed:
                break
            nxt = max(t for t, _ in placed) + step_ms
            if nxt <= since:
                raise HttpSourceError(
                    f"klines did not move past startTime {since}",
                    where={"source": self.name, "partition": partition},
                )
            since = nxt
        return WindowRead([rows[t] for t in sorted(rows)], end, rejected)

    def _klines(self, partition: str, since_ms: int, end_ms: int) -> Any:
        params = {
            "symbol": partition,
            "interval": self.cfg.interval,
            "startTime": since_ms,
            "endTime": end_ms - 1,
            "limit": self.cfg.limit,
        }
        return self.http.get_json(
            "/api/v3/klines",
            params,
            cost=KLINES_WEIGHT,
            check=_klines_shape,
            context={"source": self.name, "partition": partition},
            exact_numbers=True,
        )

    def _row(self, partition: str, open_ms: int, k: list[Any]) -> Row:
        # Open, high, low, close, volume, quote volume and trades as sent: decimal strings
        # stay exact, a null stays missing.
        return [
            "binance",
            partition,
            self.cfg.interval,
            iso_utc(datetime.fromtimestamp(open_ms / 1000, UTC)),
            k[1],
            k[2],
            k[3],
            k[4],
            k[5],
            k[7],
            None,
            k[8],
        ]

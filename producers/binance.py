"""Binance spot klines (apis.md §4): `GET /api/v3/klines` per symbol into historical_prices.

A window is `limit` bars from its start: one call (weight 2) with startTime and endTime (the
last millisecond of the window); a full answer that stops short of the window's end (repeated
bars took room) is followed by one from the bar after its last. Times are sent in milliseconds
and the `X-MBX-TIME-UNIT` header is never sent, so times come back in milliseconds. Bars outside
the window (overlaps) and repeats are dropped. The `x-mbx-used-weight-1m` header counts what the
whole IP used this minute, including clients we do not see: near the limit every producer pauses
until the minute ends.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import requests

from producers.http_client import Retry
from producers.http_source import HttpSource, Row, floor_time, iso_utc
from shared.errors import HttpSourceError
from shared.settings import BinanceSourceConfig, Settings
from shared.streams import Stream

KLINES_WEIGHT = 2
PUBLISHED_WEIGHT_PER_MINUTE = 6000
PAUSE_AT = 0.9  # of the published weight

INTERVAL_SECONDS = {
    "1s": 1, "1m": 60, "3m": 180, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "2h": 7200,
    "4h": 14400, "6h": 21600, "8h": 28800, "12h": 43200, "1d": 86400, "3d": 259200,
    "1w": 604800,
}  # fmt: skip


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _klines_shape(body: Any) -> Retry | None:
    # A wrong shape (an object where the array belongs) is a server or proxy fault: retry.
    if not isinstance(body, list) or not all(isinstance(r, list) and len(r) >= 11 for r in body):
        return Retry(f"klines body is not an array of 12-element arrays: {str(body)[:100]}")
    return None


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

    def fetch(self, partition: str, start: datetime, end: datetime) -> list[Row]:
        start = floor_time(start, self.step)  # bars open on interval boundaries
        lo, hi = _ms(start), _ms(end)
        step_ms = int(self.step.total_seconds() * 1000)
        rows: dict[int, Row] = {}
        since = lo
        # A window is `limit` bars, so one call normally covers it; a full answer that ends
        # before the window does (repeated bars took room) continues from the bar after its
        # last (apis.md §4 pagination), until a short answer or the window's end.
        while since < hi:
            body = self._klines(partition, since, hi)
            for k in body:
                open_ms = int(k[0])
                if lo <= open_ms < hi:
                    rows[open_ms] = self._row(partition, open_ms, k)
            if len(body) < self.cfg.limit:
                break
            nxt = max(int(k[0]) for k in body) + step_ms
            if nxt <= since:
                raise HttpSourceError(
                    f"klines did not move past startTime {since}",
                    where={"source": self.name, "partition": partition},
                )
            since = nxt
        return [rows[t] for t in sorted(rows)]

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
        )

    def _row(self, partition: str, open_ms: int, k: list[Any]) -> Row:
        return [
            "binance",
            partition,
            self.cfg.interval,
            iso_utc(datetime.fromtimestamp(open_ms / 1000, UTC)),
            float(k[1]),
            float(k[2]),
            float(k[3]),
            float(k[4]),
            float(k[5]),
            float(k[7]),
            None,
            int(k[8]),
        ]

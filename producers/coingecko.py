"""CoinGecko `GET /coins/{id}/market_chart/range` per coin into historical_prices
(https://docs.coingecko.com/reference/coins-id-market-chart-range).

No pagination: each window (at most `window_days`, <= 90 days so the API answers hourly) is one
call with `from`/`to` in UNIX seconds. Windows are counted from the hour their start is in, so
a call never spans more than `window_days` even from an unaligned start (a range over 90 days
would silently come back as one point per day).

Points are prices and market caps (no OHLC; `total_volumes` is a rolling 24-hour volume, not
the period's, so it is not stored): the price as `close`, the market cap of the same hour as
`market_cap`, resolution `1h`, symbol `<coin>/<vs_currency>`. Values keep the literal text of
their JSON numbers (a double would round them). Timestamps (milliseconds) are not aligned
(jitter, and a last point at "now"), so each point is bucketed to its hour and the first point
of an hour with a price wins; points just outside the window (the edges of neighbouring chunks)
are dropped, so a chunk boundary never stores an hour twice. Points far outside the window
(times in seconds) fail it. An hour whose points all have a null price travels with a null
`close` (a dead letter naming it); a missing market cap stays null. Only closed hours are
fetched.

Errors: a 429 comes without Retry-After (the client waits for `x-ratelimit-reset` or
`rate_limit_fallback_seconds`, pausing every process). 401 with error_code 10012 (history older
than 365 days on the public/Demo plan) is permanent: the partition fails at once, naming the
fix, and is not retried.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

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
from sluice.shared.settings import CoinGeckoSourceConfig, Settings
from sluice.shared.streams import Stream

HOUR = timedelta(hours=1)
HISTORY_LIMIT_CODE = "10012"


def _chart_shape(body: Any) -> Retry | None:
    if not isinstance(body, dict) or not isinstance(body.get("prices"), list):
        return Retry(f"market_chart body without a prices array: {str(body)[:100]}")
    return None


def _point(p: Any) -> tuple[int | None, str]:
    """A point's time (ms), or None and why it cannot be placed."""
    if not isinstance(p, list) or len(p) < 2:
        return None, f"point {str(p)[:60]} is not a [time, value] pair"
    t = whole_number(p[0])
    if t is None:
        return None, f"time {str(p[0])[:40]!r} is not a number"
    return t, ""


class CoinGeckoSource(HttpSource):
    api = "coingecko"
    cfg: CoinGeckoSourceConfig

    def __init__(self, name: str, cfg: CoinGeckoSourceConfig, stream: Stream, settings: Settings):
        super().__init__(name, cfg, stream, settings)
        key = self.secret()
        header = "x-cg-pro-api-key" if cfg.plan == "pro" else "x-cg-demo-api-key"
        self.http = self.make_api(headers={header: key} if key else None)

    def partitions(self) -> list[str]:
        return list(self.cfg.coins)

    def period(self) -> timedelta:
        return HOUR

    def window(self) -> timedelta:
        return timedelta(days=self.cfg.window_days)

    def closed_until(self, now: datetime) -> datetime:
        return floor_time(now, HOUR)

    def initial_start(self) -> datetime:
        return floor_time(super().initial_start(), HOUR)

    def read_window(self, partition: str, start: datetime, end: datetime) -> WindowRead:
        lo, hi = floor_time(start, HOUR), end
        params = {
            "vs_currency": self.cfg.vs_currency,
            "from": int(lo.timestamp()),
            "to": int(hi.timestamp()),
        }
        context = {"source": self.name, "partition": partition}
        try:
            body = self.http.get_json(
                f"/coins/{quote(partition, safe='')}/market_chart/range",
                params,
                check=_chart_shape,
                context=context,
                exact_numbers=True,
            )
        except HttpSourceError as exc:
            if exc.status == 401 and HISTORY_LIMIT_CODE in str(exc):
                raise HttpSourceError(
                    f"coingecko refuses history older than 365 days on this plan (error "
                    f"{HISTORY_LIMIT_CODE}; permanent, not retried): set `start` or "
                    f"`initial_days` within the last 365 days, or use a paid plan",
                    status=401,
                    where={**context, "from": iso_utc(lo)},
                ) from exc
            raise
        rejected: list[SourceReject] = []
        prices = self._hourly(partition, body["prices"], lo, hi, rejected, "prices")
        caps_body = body.get("market_caps")
        caps = (
            self._hourly(partition, caps_body, lo, hi, rejected, "market_caps")
            if isinstance(caps_body, list)
            else {}
        )
        symbol = f"{partition}/{self.cfg.vs_currency}"
        rows: list[Row] = []
        for bucket, price in sorted(prices.items()):
            rows.append(
                ["coingecko", symbol, "1h", iso_utc(bucket), None, None, None, price,
                 None, None, caps.get(bucket), None]
            )  # fmt: skip
        return WindowRead(rows, end, rejected)

    def _hourly(
        self,
        partition: str,
        points: list[Any],
        lo: datetime,
        hi: datetime,
        rejected: list[SourceReject],
        series: str,
    ) -> dict[datetime, Any]:
        """The series' value per hour of [lo, hi): the hour's first point with a value (null
        when every point of the hour is null)."""
        placed: list[tuple[int, Any]] = []
        for i, p in enumerate(points):
            ms, why = _point(p)
            if ms is None:
                where = f"{series} point #{i} of the answer from {int(lo.timestamp())}"
                rejected.append(self.reject(partition, p, why, where))
            else:
                placed.append((ms, p[1]))
        self.check_times(partition, lo, hi, [ms for ms, _ in placed], 0.001, series)
        lo_ms, hi_ms = int(lo.timestamp() * 1000), int(hi.timestamp() * 1000)
        chosen: dict[datetime, tuple[tuple[bool, int], Any]] = {}
        for ms, value in placed:
            if not lo_ms <= ms < hi_ms:
                continue  # the edge of a neighbouring chunk
            bucket = floor_time(datetime.fromtimestamp(ms / 1000, UTC), HOUR)
            rank = (value is None, ms)  # a value beats a null, then the earliest point wins
            if bucket not in chosen or rank < chosen[bucket][0]:
                chosen[bucket] = (rank, value)
        return {bucket: value for bucket, (_, value) in chosen.items()}

"""CoinGecko `GET /coins/{id}/market_chart/range` (apis.md §5) per coin into historical_prices.

No pagination: each window (at most `window_days`, <= 90 days so the API answers hourly) is one
call with `from`/`to` in UNIX seconds. Windows are counted from the hour their start is in, so
a call never spans more than `window_days` even from an unaligned start (a range over 90 days
would silently come back as one point per day).

Points are prices only (no OHLC, no per-period volume): stored as `close`, resolution `1h`,
symbol `<coin>/<vs_currency>`. Their timestamps are not aligned (milliseconds of jitter, and a
last point at "now"), so each is bucketed to its hour and the first point of an hour wins;
points outside the window (the edges of neighbouring chunks) are dropped, so a chunk boundary
never stores an hour twice. Only closed hours are fetched.

Errors: a 429 comes without Retry-After (the client waits for `x-ratelimit-reset` or
`rate_limit_fallback_seconds`, pausing every process). 401 with error_code 10012 (history older
than 365 days on the public/Demo plan) is permanent: the run fails at once, naming the fix, and
is not retried.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from producers.http_client import Retry
from producers.http_source import HttpSource, Row, floor_time, iso_utc
from shared.errors import HttpSourceError
from shared.settings import CoinGeckoSourceConfig, Settings
from shared.streams import Stream

HOUR = timedelta(hours=1)
HISTORY_LIMIT_CODE = "10012"


def _chart_shape(body: Any) -> Retry | None:
    if not isinstance(body, dict) or not isinstance(body.get("prices"), list):
        return Retry(f"market_chart body without a prices array: {str(body)[:100]}")
    return None


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

    def fetch(self, partition: str, start: datetime, end: datetime) -> list[Row]:
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
        symbol = f"{partition}/{self.cfg.vs_currency}"
        rows: dict[datetime, Row] = {}
        first_ms: dict[datetime, int] = {}
        for point in body["prices"]:
            if not isinstance(point, list) or len(point) < 2 or point[1] is None:
                continue
            ms = int(point[0])
            t = datetime.fromtimestamp(ms / 1000, UTC)
            if not lo <= t < hi:
                continue
            bucket = floor_time(t, HOUR)
            if bucket in first_ms and first_ms[bucket] <= ms:
                continue  # the hour already has an earlier point (a repeat at a chunk edge)
            first_ms[bucket] = ms
            price = float(point[1])
            rows[bucket] = [
                "coingecko", symbol, "1h", iso_utc(bucket),
                None, None, None, price, None, None, None, None,
            ]  # fmt: skip
        return [rows[t] for t in sorted(rows)]

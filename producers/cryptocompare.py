"""CryptoCompare histohour / histominute (apis.md §6) per pair into historical_prices.

Pages backwards: `toTs` is the newest candle wanted (inclusive), the answer holds `limit + 1`
candles ending there, and the next call asks for `TimeFrom - period`, until the window's start.
Errors come inside HTTP 200 (`Response: "Error"`): the rate-limit one (Type 99) is retried after
a pause, the others are permanent. Candles before a pair existed are zero-filled: dropped, and a
page of nothing but zeros ends the paging (there is nothing older). The key goes in the
`authorization` header, never in the URL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from producers.http_client import Retry
from producers.http_source import HttpSource, Row, floor_time, iso_utc
from shared.errors import HttpSourceError
from shared.settings import CryptoCompareSourceConfig, Settings
from shared.streams import Stream

PERIODS = {"histohour": (3600, "1h"), "histominute": (60, "1m")}
RATE_LIMIT_TYPE = 99


class CryptoCompareSource(HttpSource):
    api = "cryptocompare"
    cfg: CryptoCompareSourceConfig

    def __init__(
        self, name: str, cfg: CryptoCompareSourceConfig, stream: Stream, settings: Settings
    ):
        super().__init__(name, cfg, stream, settings)
        seconds, self.resolution = PERIODS[cfg.endpoint]
        self.step = timedelta(seconds=seconds)
        key = self.secret()
        self.http = self.make_api(headers={"authorization": f"Apikey {key}"} if key else None)

    def partitions(self) -> list[str]:
        return list(self.cfg.pairs)

    def period(self) -> timedelta:
        return self.step

    def window(self) -> timedelta:
        return self.step * (self.cfg.limit + 1)  # one call returns limit + 1 candles

    def closed_until(self, now: datetime) -> datetime:
        return floor_time(now, self.step)

    def initial_start(self) -> datetime:
        return floor_time(super().initial_start(), self.step)

    def _check(self, partition: str) -> Any:
        def check(body: Any) -> Retry | None:
            if not isinstance(body, dict):
                return Retry(f"body is {type(body).__name__}, not an object")
            if body.get("Response") == "Error":
                message = str(body.get("Message") or "no message")
                if body.get("Type") == RATE_LIMIT_TYPE or "rate limit" in message.lower():
                    return Retry(f"rate limited: {message}", rate_limited=True, wait=1.0)
                raise HttpSourceError(
                    f"cryptocompare error inside HTTP 200: {message}",
                    where={
                        "source": self.name,
                        "partition": partition,
                        "param": body.get("ParamWithError"),
                    },
                )
            data = body.get("Data")
            if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
                return Retry("response without Data.Data")
            return None

        return check

    def fetch(self, partition: str, start: datetime, end: datetime) -> list[Row]:
        fsym, tsym = partition.split("/")
        step = int(self.step.total_seconds())
        lo = int(floor_time(start, self.step).timestamp())
        hi = int(end.timestamp())  # exclusive
        to_ts = hi - step
        rows: dict[int, Row] = {}
        while to_ts >= lo:
            limit = max(1, min(self.cfg.limit, (to_ts - lo) // step))
            params: dict[str, Any] = {"fsym": fsym, "tsym": tsym, "limit": limit, "toTs": to_ts}
            if self.cfg.exchange:
                params["e"] = self.cfg.exchange
            body = self.http.get_json(
                f"/data/v2/{self.cfg.endpoint}",
                params,
                check=self._check(partition),
                context={"source": self.name, "partition": partition},
            )
            data = body["Data"]
            candles = data["Data"]
            nonzero = 0
            for c in candles:
                t = int(c["time"])
                prices = [float(c.get(f) or 0) for f in ("open", "high", "low", "close")]
                if not any(prices):
                    continue  # zero-filled: the pair did not exist yet
                nonzero += 1
                if lo <= t < hi:
                    rows[t] = [
                        "cryptocompare",
                        partition,
                        self.resolution,
                        iso_utc(datetime.fromtimestamp(t, UTC)),
                        *prices,
                        float(c.get("volumefrom") or 0),
                        float(c.get("volumeto") or 0),
                        None,
                        None,
                    ]
            time_from = int(data.get("TimeFrom") or (candles[0]["time"] if candles else to_ts))
            if not candles or nonzero == 0:
                break  # nothing older exists
            if time_from > to_ts:
                raise HttpSourceError(
                    f"TimeFrom {time_from} did not move back from toTs {to_ts}",
                    where={"source": self.name, "partition": partition},
                )
            to_ts = time_from - step
        return [rows[t] for t in sorted(rows)]

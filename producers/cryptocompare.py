"""CryptoCompare histohour / histominute per pair into historical_prices
(https://developers.coindesk.com/documentation/legacy/Historical/dataHistohour).

Pages backwards: `toTs` is the newest candle wanted (inclusive), the answer holds `limit + 1`
candles ending there, and the next call asks for `TimeFrom - period`, until the window's start.
Candle times are epoch seconds: candles far outside the span asked for (milliseconds) fail the
window rather than being taken for "no data". Candles before a pair existed are zero-filled
(open, high, low and close all 0): dropped, and a page of nothing but zeros ends the paging
(there is nothing older). A candle with a null price is not zero-filled: it travels with the
null (a missing close becomes a dead letter naming it). Prices and volumes keep the literal text
of their JSON numbers (a double would round them). The key goes in the `authorization` header,
never in the URL.

Errors come inside HTTP 200 (`Response: "Error"`) and are permanent, except the rate-limit one
(Type 99). Its `RateLimit` says which limit was reached: calls made and allowed per second,
minute, hour, day and month. A per-second or per-minute limit is waited out (every process
pauses); a used-up hourly, daily or monthly quota bans the API until that quota resets when the
wait is longer than `max_wait_seconds`, and the run ends naming the quota and the reset time.
"""

from __future__ import annotations

import calendar
import time
from datetime import UTC, datetime, timedelta
from typing import Any

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
from sluice.shared.settings import CryptoCompareSourceConfig, Settings
from sluice.shared.streams import Stream

PERIODS = {"histohour": (3600, "1h"), "histominute": (60, "1m")}
RATE_LIMIT_TYPE = 99
PRICES = ("open", "high", "low", "close")
# The rate-limit windows, shortest first, and how a quota of each is named in errors.
QUOTAS = (
    ("second", "per-second"),
    ("minute", "per-minute"),
    ("hour", "hourly"),
    ("day", "daily"),
    ("month", "monthly"),
)


def quota_reset(window: str, now: float) -> float:
    """When a quota of `window` starts over: the next UTC second, minute, hour, day or month
    (the limits count calendar periods)."""
    if window == "second":
        return float(int(now) + 1)
    if window in ("minute", "hour", "day"):
        size = {"minute": 60, "hour": 3600, "day": 86400}[window]
        return float((int(now) // size + 1) * size)
    t = datetime.fromtimestamp(now, UTC)
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def rate_limit_retry(body: dict[str, Any], message: str, now: float | None = None) -> Retry:
    """The wait a Type 99 answer asks for: until the longest limit it reports as reached
    resets; a second when it reports none (an empty `RateLimit`)."""
    now = time.time() if now is None else now
    limits = body.get("RateLimit")
    made = limits.get("calls_made") if isinstance(limits, dict) else None
    allowed = limits.get("max_calls") if isinstance(limits, dict) else None
    reached = None
    if isinstance(made, dict) and isinstance(allowed, dict):
        for window, label in QUOTAS:
            n, cap = whole_number(made.get(window)), whole_number(allowed.get(window))
            if n is not None and cap is not None and n >= cap:
                reached = (window, label, n, cap)  # the longest reached wins: later resets
    if reached is None:
        return Retry(f"rate limited: {message}", wait=1.0, rate_limited=True)
    window, label, n, cap = reached
    reset = quota_reset(window, now)
    return Retry(
        f"cryptocompare {label} call limit reached ({n} calls made, {cap} allowed); it resets "
        f"at {iso_utc(datetime.fromtimestamp(reset, UTC))}",
        wait=max(reset - now, 0.001),
        rate_limited=True,
    )


def _is_zero(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return False
    try:
        return float(value) == 0.0
    except (TypeError, ValueError):
        return False


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
                    return rate_limit_retry(body, message)
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

    def read_window(self, partition: str, start: datetime, end: datetime) -> WindowRead:
        fsym, tsym = partition.split("/")
        step = int(self.step.total_seconds())
        lo = int(floor_time(start, self.step).timestamp())
        hi = int(end.timestamp())  # exclusive
        to_ts = hi - step
        rows: dict[int, Row] = {}
        rejected: list[SourceReject] = []
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
                exact_numbers=True,
            )
            data = body["Data"]
            candles = data["Data"]
            placed: list[tuple[int, dict[str, Any]]] = []
            for i, c in enumerate(candles):
                t = whole_number(c.get("time")) if isinstance(c, dict) else None
                if t is None:
                    why = (
                        f"time {str(c.get('time'))[:40]!r} is not a number"
                        if isinstance(c, dict)
                        else f"candle is a JSON {type(c).__name__}, not an object"
                    )
                    where = f"candle #{i} of the answer up to toTs {to_ts}"
                    rejected.append(self.reject(partition, c, why, where))
                else:
                    placed.append((t, c))
            self.check_times(
                partition,
                datetime.fromtimestamp(to_ts - limit * step, UTC),
                datetime.fromtimestamp(to_ts, UTC),
                [t for t, _ in placed],
                1.0,
                "candles",
            )
            kept = 0
            for t, c in placed:
                if all(_is_zero(c.get(f)) for f in PRICES):
                    continue  # zero-filled: the pair did not exist yet
                kept += 1
                if lo <= t < hi:
                    rows[t] = [
                        "cryptocompare",
                        partition,
                        self.resolution,
                        iso_utc(datetime.fromtimestamp(t, UTC)),
                        *(c.get(f) for f in PRICES),
                        c.get("volumefrom"),
                        c.get("volumeto"),
                        None,
                        None,
                    ]
            if not candles or kept + len(candles) - len(placed) == 0:
                break  # nothing older exists
            time_from = whole_number(data.get("TimeFrom"))
            if time_from is None:
                if not placed:
                    break  # nowhere to page from; what could not be placed is dead-lettered
                time_from = min(t for t, _ in placed)
            if time_from > to_ts:
                raise HttpSourceError(
                    f"TimeFrom {time_from} did not move back from toTs {to_ts}",
                    where={"source": self.name, "partition": partition},
                )
            to_ts = time_from - step
        return WindowRead([rows[t] for t in sorted(rows)], end, rejected)

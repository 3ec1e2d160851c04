"""Fake Binance klines, CryptoCompare histohour/histominute, CoinGecko market_chart/range and ACE
IoT paginated timeseries on 127.0.0.1.

Candles are generated on demand from the request's times (deterministic prices), so any range
can be asked for. Every request is logged (path, query, headers) and a fault plan injects
failures into the next requests:

    with FakeMarket() as fake:
        fake.fail_next("status", status=429, headers={"Retry-After": "1"})
        fake.fail_next("status", status=502, body="<html>bad gateway</html>",
                       content_type="text/html")
        fake.fail_next("truncated")              # the real answer, cut in half
        fake.fail_next("body", body='{"Response":"Error","Message":"x","Type":2}')
        fake.fail_at(5, "status", status=429, headers={"Retry-After": "1"})  # the 6th request
        fake.fail_next("time_unit", unit="s")    # the real answer, its times in seconds
        fake.fail_next("delay", delay=0.5)       # the real answer, half a second late
        fake.fail_next("trickle", rate=16)       # the real answer at 16 bytes a second
        fake.fail_next("oversized", size=50_000_000, send_length=False)  # 50 MB of JSON

`time_unit` changes the unit of the answer's times: Binance open and close times and CoinGecko
point times in seconds ("s") instead of milliseconds; CryptoCompare candle times in milliseconds
("ms") instead of seconds (its TimeFrom/TimeTo stay in seconds).

`missing` holds period start times (epoch seconds) every API leaves out (a gap); `duplicate`
holds times every API sends twice in the same answer. `unknown` holds Binance symbols (answered
400 -1121 "Invalid symbol.") and CoinGecko coin ids (404 "coin not found") the APIs do not know.
`listed_from` is when the markets start: Binance answers no bars before it, CryptoCompare
zero-filled candles.

ACE: samples of `ace_points` every `ace_interval` seconds in (time, name) order, naive UTC times,
string values; `ace_overlap` repeats that many samples of a page at the start of the next;
`ace_bug` = "stuck" sends back the cursor it received (the server's offset bug), "null_cursor"
answers has_more with a null cursor on the second page.

CoinGecko: auto-granularity by range length: more than 90 days gives a point per day
at 00:00 UTC; at most 1 day ending within the last hour ("now") gives 5-minute points; anything
else gives a point per hour. Each point is `cg_jitter_ms` after its period start; a second point
in the first hour and one more at the window's end (the next chunk's first) are added. Ranges
starting more than 365 days ago get the Demo plan's 401/10012. Market caps are `cap(t)`, not
the price.

CryptoCompare: with `cc_key` set, a request without `authorization: Apikey <key>` gets the 401
`Err` envelope; zero-filled candles before `listed_from`.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

JSON = "application/json; charset=UTF-8"
BINANCE_INTERVALS = {"1m": 60, "1h": 3600}


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


@dataclass
class Fault:
    kind: str  # status | body | truncated | time_unit | delay | trickle | oversized
    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON
    unit: str = "s"  # time_unit: "s" (Binance, CoinGecko) or "ms" (CryptoCompare)
    delay: float = 0.0  # delay: seconds before the answer
    rate: float = 16.0  # trickle: bytes a second
    size: int = 0  # oversized: bytes of the body
    send_length: bool = True  # oversized: announce the size in Content-Length


def price(t: int) -> float:
    return 100.0 + (t // 60) % 50


def cap(t: int) -> float:
    """CoinGecko's market cap at epoch second t."""
    return price(t) * 1000 + 0.25


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, fake: FakeMarket) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeMarket:
    def __init__(self, *, listed_from: int = 0, used_weight: int | None = None) -> None:
        self.requests: list[Seen] = []
        self.listed_from = listed_from  # CryptoCompare: zero candles before this epoch second
        self.used_weight = used_weight  # Binance: x-mbx-used-weight-1m value sent back
        self.missing: set[int] = set()  # period start times (s) every API leaves out (a gap)
        self.duplicate: set[int] = set()  # period start times (s) every API sends twice
        self.cc_key: str | None = None  # CryptoCompare: require this key when set
        self.unknown: set[str] = set()  # Binance symbols and CoinGecko coins that do not exist
        self._faults: deque[Fault] = deque()
        self._faults_at: dict[int, Fault] = {}
        self.ace_key = "ace-test-key"
        self.ace_site = "demo_site"
        self.ace_points = ["demo/site/ahu1/temp", "demo/site/ahu1/damper"]
        self.ace_interval = 300
        self.ace_overlap = 0
        self.ace_bug: str | None = None
        self.cg_jitter_ms = 1234
        self._served = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None

    def __enter__(self) -> FakeMarket:
        self._server = _Server(self)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, kind: str, count: int = 1, **options: Any) -> None:
        with self._lock:
            self._faults.extend([Fault(kind, **options)] * count)

    def fail_at(self, index: int, kind: str, **options: Any) -> None:
        """Inject a fault into the request with this 0-based number (counted over every
        request this fake has logged, cleared or not)."""
        with self._lock:
            self._faults_at[index] = Fault(kind, **options)

    def _handle(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append(Seen(url.path, query, dict(h.headers.items()), time.time()))
            fault = self._faults_at.pop(self._served, None)
            self._served += 1
            if fault is None and self._faults:
                fault = self._faults.popleft()
        if fault is not None and fault.kind in ("status", "body"):
            return self._send(
                h, fault.status, fault.body.encode(), fault.content_type, fault.headers
            )
        if fault is not None and fault.kind == "oversized":
            return self._send_oversized(h, fault)
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay)
        if url.path == "/api/v3/klines":
            status, body, headers = self._klines(query)
        elif url.path in ("/data/v2/histohour", "/data/v2/histominute"):
            auth = {k.lower(): v for k, v in h.headers.items()}.get("authorization", "")
            status, body, headers = self._histo(url.path.rsplit("/", 1)[1], query, auth)
        elif url.path.startswith("/sites/") and url.path.endswith("/timeseries/paginated"):
            site = url.path.split("/")[2]
            auth = {k.lower(): v for k, v in h.headers.items()}.get("authorization", "")
            status, body, headers = self._ace(site, auth, query)
        elif url.path.startswith("/coins/") and url.path.endswith("/market_chart/range"):
            status, body, headers = self._coingecko(url.path.split("/")[2], query)
        else:
            status, body, headers = 404, {"message": "not found"}, {}
        if fault is not None and fault.kind == "time_unit" and status == 200:
            _change_time_unit(url.path, body, fault.unit)
        raw = json.dumps(body).encode()
        if fault is not None and fault.kind == "truncated":
            raw = raw[: len(raw) // 2]
        if fault is not None and fault.kind == "trickle":
            return self._send_trickle(h, status, raw, headers, fault.rate)
        self._send(h, status, raw, JSON, headers)

    def _send_trickle(
        self, h: _Handler, status: int, raw: bytes, headers: dict[str, str], rate: float
    ) -> None:
        """The whole answer, `rate` bytes a second, until the client hangs up."""
        h.send_response(status)
        h.send_header("Content-Type", JSON)
        h.send_header("Content-Length", str(len(raw)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        tick = 0.05
        piece = max(1, int(rate * tick))
        try:
            for i in range(0, len(raw), piece):
                h.wfile.write(raw[i : i + piece])
                h.wfile.flush()
                time.sleep(tick)
        except OSError:
            pass  # the client gave up

    def _send_oversized(self, h: _Handler, fault: Fault) -> None:
        """A JSON array of `size` bytes (`[0,0,...,0]`), written as it goes (never held)."""
        h.send_response(200)
        h.send_header("Content-Type", JSON)
        if fault.send_length:
            h.send_header("Content-Length", str(fault.size))
        h.end_headers()
        zeros = max(1, (fault.size - 1) // 2)  # "[" + "0," * (n - 1) + "0]"
        chunk = b"0," * 32768
        try:
            h.wfile.write(b"[")
            left = zeros - 1
            while left > 0:
                n = min(left, 32768)
                h.wfile.write(chunk[: 2 * n])
                left -= n
            h.wfile.write(b"0]")
        except OSError:
            pass  # the client stopped reading

    def _send(
        self, h: _Handler, status: int, raw: bytes, ctype: str, headers: dict[str, str]
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(raw)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        with contextlib.suppress(OSError):  # the client gave up waiting (a delay fault)
            h.wfile.write(raw)

    def _klines(self, q: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if q.get("symbol") in self.unknown:
            return 400, {"code": -1121, "msg": "Invalid symbol."}, {}
        step = BINANCE_INTERVALS.get(q.get("interval", ""))
        if step is None:
            return 400, {"code": -1120, "msg": "Invalid interval."}, {}
        limit = int(q.get("limit", 500))
        start_ms = int(q["startTime"])
        end_ms = int(q.get("endTime", time.time() * 1000))
        t = -(-start_ms // (step * 1000)) * step  # first open time at or after startTime
        t = max(t, -(-self.listed_from // step) * step)  # no bars before the listing
        now = time.time()
        bars: list[list[Any]] = []
        while t * 1000 <= end_ms and len(bars) < limit and t <= now:
            for _ in range(2 if t in self.duplicate else 0 if t in self.missing else 1):
                p = price(t)
                bars.append(
                    [
                        t * 1000,
                        f"{p:.8f}",
                        f"{p + 1:.8f}",
                        f"{p - 1:.8f}",
                        f"{p + 0.5:.8f}",
                        "10.5",
                        t * 1000 + step * 1000 - 1,
                        "1050.0",
                        7,
                        "5.0",
                        "500.0",
                        "0",
                    ]
                )
            t += step
        headers = {"x-mbx-used-weight-1m": str(self.used_weight or 2), "x-mbx-used-weight": "2"}
        return 200, bars, headers

    def _histo(
        self, endpoint: str, q: dict[str, str], auth: str
    ) -> tuple[int, Any, dict[str, str]]:
        if self.cc_key is not None and auth != f"Apikey {self.cc_key}":
            return (
                401,
                {
                    "Data": {},
                    "Err": {
                        "type": 2,
                        "message": "API key required, please refer to the documentation at "
                        "https://developers.coindesk.com/",
                        "http_status_code": 401,
                    },
                },
                {},
            )
        if "fsym" not in q:
            return (
                200,
                {
                    "Response": "Error",
                    "Message": "fsym param seems to be missing.",
                    "HasWarning": False,
                    "Type": 2,
                    "RateLimit": {},
                    "Data": {},
                    "ParamWithError": "fsym",
                },
                {},
            )
        step = 3600 if endpoint == "histohour" else 60
        limit = int(q.get("limit", 168))
        to_ts = int(q.get("toTs", time.time())) // step * step
        first = to_ts - limit * step
        candles = []
        for t in range(first, to_ts + step, step):
            p = price(t) if t >= self.listed_from else 0.0
            candles.extend(
                [
                    {
                        "time": t,
                        "high": p + 1 if p else 0,
                        "low": p - 1 if p else 0,
                        "open": p,
                        "volumefrom": 1.5 if p else 0,
                        "volumeto": 150.0 if p else 0,
                        "close": p + 0.5 if p else 0,
                        "conversionType": "direct",
                        "conversionSymbol": "",
                    }
                ]
                * (2 if t in self.duplicate else 0 if t in self.missing else 1)
            )
        return (
            200,
            {
                "Response": "Success",
                "Message": "",
                "HasWarning": False,
                "Type": 100,
                "RateLimit": {},
                "Data": {"Aggregated": False, "TimeFrom": first, "TimeTo": to_ts, "Data": candles},
            },
            {},
        )

    def _ace(self, site: str, auth: str, q: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if auth != f"Bearer {self.ace_key}":
            return 401, {"message": "Missing or invalid authorization"}, {}
        if site != self.ace_site:
            return 403, None, {}
        from datetime import UTC, datetime

        def epoch(text: str) -> int:
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp())

        lo, hi = epoch(q["start_time"]), epoch(q["end_time"])
        first = -(-lo // self.ace_interval) * self.ace_interval
        samples = [
            {
                "name": name,
                "value": f"{price(t) + i / 10:.1f}",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)),
            }
            for t in range(first, hi + 1, self.ace_interval)  # end_time inclusive
            for i, name in enumerate(sorted(self.ace_points))
            for _ in range(2 if t in self.duplicate else 0 if t in self.missing else 1)
        ]
        if not samples:
            return 404, {"message": "No data for time period"}, {}
        size = int(q.get("page_size", 10000))
        incoming = q.get("cursor")
        offset = json.loads(base64.b64decode(incoming))["offset"] if incoming else 0
        page = samples[offset : offset + size]
        has_more = offset + size < len(samples)
        nxt: str | None = None
        if has_more:
            nxt = base64.b64encode(
                json.dumps({"offset": offset + size - self.ace_overlap}).encode()
            ).decode()
            if self.ace_bug == "stuck" and incoming:
                nxt = incoming
            if self.ace_bug == "null_cursor" and incoming:
                nxt = None
        return 200, {"point_samples": page, "next_cursor": nxt, "has_more": has_more}, {}

    def _coingecko(self, coin: str, q: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if coin in self.unknown:
            return 404, {"error": "coin not found"}, {}
        lo, hi = int(q["from"]), int(q["to"])
        if lo < time.time() - 365 * 86400:
            return (
                401,
                {
                    "error": {
                        "status": {
                            "timestamp": "2026-10-07T13:32:10.955+00:00",
                            "error_code": 10012,
                            "error_message": "Your request exceeds the allowed time range. "
                            "Public API users are limited to querying historical data within "
                            "the past 365 days.",
                        }
                    }
                },
                {},
            )
        now = time.time()
        if hi - lo > 90 * 86400:
            step = 86400  # daily, at 00:00 UTC
        elif hi - lo <= 86400 and hi >= now - 3600:
            step = 300  # 1 day from now: 5-minute points
        else:
            step = 3600
        times = [
            t * 1000 + self.cg_jitter_ms
            for t in range(-(-lo // step) * step, hi, step)
            for _ in range(2 if t in self.duplicate else 0 if t in self.missing else 1)
        ]
        if times:
            times.append(hi * 1000 + self.cg_jitter_ms)  # the next chunk's first
            times.insert(1, times[0] + 60_000)  # a second point in the same hour
        prices = [[ms, price(ms // 1000)] for ms in times]
        caps = [[ms, cap(ms // 1000)] for ms in times]
        if len(prices) > 1:
            prices[1][1] += 3  # not the hour's first: never stored
        volumes = [[ms, 5e6] for ms in times]
        return 200, {"prices": prices, "market_caps": caps, "total_volumes": volumes}, {}


def _change_time_unit(path: str, body: Any, unit: str) -> None:
    """Rewrite the times of a real answer in another unit (see the module docstring)."""
    if path == "/api/v3/klines" and unit == "s":
        for k in body:
            k[0], k[6] = k[0] // 1000, k[6] // 1000
    elif path.endswith("/market_chart/range") and unit == "s":
        for series in body.values():
            for point in series:
                point[0] //= 1000
    elif path.startswith("/data/v2/") and unit == "ms":
        for c in body["Data"]["Data"]:
            c["time"] *= 1000

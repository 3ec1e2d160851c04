"""The HTTP layer every API source uses: one pooled session per process, timeouts, retries,
Retry-After, errors inside HTTP 200, the shared rate limit and bans.

- Retried: 429, 5xx (HTML bodies included), connection errors and timeouts, and 2xx bodies that
  do not parse (truncated, a proxy's page): up to `max_attempts`, waiting what the server asked
  (`Retry-After` in seconds or as an HTTP date, `retry-after-ms`, CoinGecko's `x-ratelimit-reset`)
  or a capped exponential backoff with jitter.
- A 429 pauses the API for every process (the rate limiter's pause), not only this one.
- A 418 (Binance's ban) or a wait longer than `max_wait` bans the API in Redis until it ends:
  every process's calls fail at once with ApiBannedError naming the end, instead of hammering.
- Other 4xx are permanent errors.
- Every call has a total deadline (connect, headers and body: `total_timeout`), so a server
  trickling its answer cannot hold a run; an overrun is retried like a timeout. The body is read
  in pieces and refused past `max_response_bytes` (permanent: the same request gets the same
  answer), so one oversized answer cannot take the process's memory.
- `exact_numbers` keeps each JSON number with a fraction or exponent as its literal text
  ("819993474.31887912"), where a double would round it; integers stay ints.
- An adapter's `check(body)` inspects a parsed 200 body and may raise (a permanent error inside
  200) or return a Retry (CryptoCompare's rate-limit message arrives with HTTP 200).

Errors name the API, source, partition and URL without its query string: keys may travel there
(CryptoCompare's `api_key`), and nothing here logs headers.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from sluice.producers.rate_limit import SharedRateLimiter
from sluice.shared.errors import ApiBannedError, HttpSourceError

log = logging.getLogger("sluice.http")

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0
DEFAULT_BAN_SECONDS = 120.0  # Binance's shortest ban, when a 418 does not say how long
READ_CHUNK = 64 * 1024  # bytes asked of the socket at a time while reading a body

_session_lock = threading.Lock()
_session: tuple[int, requests.Session] | None = None


def shared_session() -> requests.Session:
    """The process's pooled session (connections are reused across sources and calls).

    Keyed by pid: a forked pool process must not share the parent's sockets."""
    global _session
    with _session_lock:
        if _session is None or _session[0] != os.getpid():
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            _session = (os.getpid(), s)
        return _session[1]


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, `Retry-After` (seconds or HTTP date) or CoinGecko's
    `x-ratelimit-reset` ("2025-07-25 14:54:00 +0000"); None when none is given or readable."""
    now = time.time() if now is None else now
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, float(email.utils.mktime_tz(parsed)) - now)
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - now if float(reset) > 1e9 else float(reset))
        except ValueError:
            try:
                return max(0.0, datetime.strptime(reset, "%Y-%m-%d %H:%M:%S %z").timestamp() - now)
            except ValueError:
                pass
    return None


def backoff(retries_done: int) -> float:
    return min(INITIAL_BACKOFF * 2.0**retries_done, MAX_BACKOFF) * (0.5 + random.random() / 2)


@dataclass
class Retry:
    """Returned by a `check` for an error inside HTTP 200 that a later attempt may not have."""

    message: str
    wait: float | None = None
    rate_limited: bool = False


Check = Callable[[Any], Retry | None]


def _snippet(body: bytes, limit: int = 160) -> str:
    text = " ".join(body[:limit].decode("utf-8", "replace").split())
    return text + ("..." if len(body) > limit else "")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n} bytes"


class _BodyTooLarge(Exception):
    def __init__(self, seen: int, declared: bool) -> None:
        self.seen = seen
        self.declared = declared  # from Content-Length, nothing read


class HttpApi:
    """One API (its base URL, auth headers, limiter) used by one source."""

    def __init__(
        self,
        *,
        api: str,
        base_url: str,
        limiter: SharedRateLimiter,
        headers: Mapping[str, str] | None = None,
        secrets: tuple[str, ...] = (),
        timeout: tuple[float, float] = (5.0, 30.0),
        total_timeout: float = 60.0,
        max_response_bytes: int = 16 * 1024 * 1024,
        max_attempts: int = 5,
        max_wait: float = 120.0,
        rate_limit_fallback: float = 60.0,
        on_response: Callable[[requests.Response], None] | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = api
        self.base_url = base_url.rstrip("/")
        self.limiter = limiter
        self._headers = dict(headers or {})
        self._secrets = tuple(s for s in secrets if s)
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.max_response_bytes = max_response_bytes
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self.rate_limit_fallback = rate_limit_fallback
        self._on_response = on_response
        self._session = session
        self._sleep = sleep
        self.calls = 0  # HTTP requests sent (retries included): what bounds a run

    def __repr__(self) -> str:  # no headers: they hold keys
        return f"HttpApi(api={self.api!r}, base_url={self.base_url!r})"

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _error(
        self,
        message: str,
        url: str,
        context: Mapping[str, object],
        *,
        status: int | None = None,
        transient: bool = False,
    ) -> HttpSourceError:
        where = {"api": self.api, **context, "url": url}
        return HttpSourceError(
            self._redact(message), status=status, transient=transient, where=where
        )

    def _check_ban(self, url: str, context: Mapping[str, object]) -> None:
        banned = self.limiter.banned()
        if banned is not None:
            left, reason = banned
            raise ApiBannedError(
                f"{self.api} is banned for another {left:.0f}s ({reason}); not calling it",
                until=time.time() + left,
                where={"api": self.api, **context, "url": url},
            )

    def _ban(self, seconds: float, reason: str, url: str, context: Mapping[str, object]) -> None:
        self.limiter.ban(seconds, reason)
        log.error("%s banned us for %.0fs: %s", self.api, seconds, reason)
        until = time.time() + seconds
        raise ApiBannedError(
            f"{self.api} is banned for {seconds:.0f}s ({reason}); every producer stops calling "
            f"it until then ({_utc(until)})",
            until=until,
            where={"api": self.api, **context, "url": url},
        )

    def get_json(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        cost: int = 1,
        check: Check | None = None,
        headers: Mapping[str, str] | None = None,
        context: Mapping[str, object] | None = None,
        exact_numbers: bool = False,
    ) -> Any:
        """GET base_url + path; the parsed JSON body of a successful answer. With
        `exact_numbers`, numbers with a fraction or exponent come back as their literal text."""
        url = self.base_url + path
        context = dict(context or {})
        session = self._session or shared_session()
        all_headers = {"Accept": "application/json", **self._headers, **(headers or {})}
        attempt = 0
        while True:
            attempt += 1
            self._check_ban(url, context)
            try:
                self.limiter.acquire(cost, max_wait=self.max_wait)
            except TimeoutError as exc:
                raise self._error(str(exc), url, context, transient=True) from None
            outcome = self._attempt(
                session, url, params, all_headers, check, context, exact_numbers
            )
            if not isinstance(outcome, Retry):
                return outcome
            if attempt >= self.max_attempts:
                raise self._error(
                    f"{self.api}: gave up after {attempt} attempts: {outcome.message}",
                    url,
                    context,
                    transient=True,
                )
            wait = outcome.wait
            if outcome.rate_limited:
                wait = self.rate_limit_fallback if wait is None else wait
                if wait > self.max_wait:
                    self._ban(
                        wait,
                        f"{self._redact(outcome.message)}; asked to wait {wait:.0f}s",
                        url,
                        context,
                    )
                self.limiter.pause(wait)  # every process waits, not only this one
                wait = 0.0  # acquire() sleeps through the pause
            elif wait is None:
                wait = backoff(attempt - 1)
            elif wait > self.max_wait:
                raise self._error(
                    f"{self.api} asked to wait {wait:.0f}s (over {self.max_wait:.0f}s): "
                    f"{outcome.message}",
                    url,
                    context,
                    transient=True,
                )
            log.warning(
                "%s %s: %s; attempt %d of %d in %.2fs",
                self.api,
                url,
                self._redact(outcome.message),
                attempt + 1,
                self.max_attempts,
                wait,
            )
            if wait > 0:
                self._sleep(wait)

    def _attempt(
        self,
        session: requests.Session,
        url: str,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        check: Check | None,
        context: Mapping[str, object],
        exact_numbers: bool = False,
    ) -> Any:
        started = time.monotonic()
        total = self.total_timeout
        connect, read = self.timeout
        self.calls += 1
        try:
            response = session.get(
                url,
                params=params,
                headers=headers,
                timeout=(min(connect, total), min(read, total)),
                stream=True,
            )
        except requests.Timeout as exc:
            return Retry(f"timed out ({type(exc).__name__})")
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            return Retry(f"connection failed ({type(exc).__name__})")
        except requests.RequestException as exc:
            raise self._error(
                f"request could not be sent: {type(exc).__name__}", url, context
            ) from None
        try:
            if self._on_response is not None:
                self._on_response(response)
            body = self._read_body(response, started + total)
        except _BodyTooLarge as exc:
            response.close()
            seen = (
                f"Content-Length {exc.seen} bytes"
                if exc.declared
                else f"more than {exc.seen} bytes, stopped reading"
            )
            raise self._error(
                f"HTTP {response.status_code} answer larger than max_response_bytes "
                f"({_mib(self.max_response_bytes)}): {seen}. Ask for less per call (a smaller "
                "limit, window or page_size) or raise max_response_bytes",
                url,
                context,
                status=response.status_code,
            ) from None
        except BaseException:
            response.close()  # the connection may hold unread bytes: never reused
            raise
        if isinstance(body, Retry):
            response.close()
            return body
        response.raw.release_conn()  # read to the end: the connection can serve the next call
        return self._judge(response, body, url, check, context, exact_numbers)

    def _read_body(self, response: requests.Response, deadline: float) -> bytes | Retry:
        """The whole body, read in pieces until `deadline` (a monotonic time) and at most
        `max_response_bytes`. A watchdog shuts the socket at the deadline, so a server that
        stops sending mid-body cannot hold the call past it either."""
        limit = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge(int(declared), declared=True)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return self._overrun(0)
        expired = threading.Event()
        raw = response.raw

        def cut() -> None:
            expired.set()
            # Already closed or released: the read loop sees `expired` all the same.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                raw.shutdown()

        watchdog = threading.Timer(remaining, cut)
        watchdog.daemon = True
        watchdog.start()
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = raw.read1(READ_CHUNK, decode_content=True)
                if not chunk or expired.is_set():
                    break
                size += len(chunk)
                if size > limit:
                    raise _BodyTooLarge(limit, declared=False)
                chunks.append(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if expired.is_set():
                return self._overrun(size)
            if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                return Retry(f"timed out reading the body ({size} bytes read)")
            return Retry(f"connection failed reading the body ({type(exc).__name__})")
        finally:
            watchdog.cancel()
        if expired.is_set() or time.monotonic() > deadline:
            return self._overrun(size)
        return b"".join(chunks)

    def _overrun(self, size: int) -> Retry:
        return Retry(
            f"no complete answer within total_timeout ({self.total_timeout:g}s; "
            f"{size} bytes of the body read)"
        )

    def _judge(
        self,
        response: requests.Response,
        body: bytes,
        url: str,
        check: Check | None,
        context: Mapping[str, object],
        exact_numbers: bool,
    ) -> Any:
        """What a complete answer means: a value, a Retry, or a permanent error."""
        status = response.status_code
        if status == 418:
            wait = parse_retry_after(response.headers) or DEFAULT_BAN_SECONDS
            self._ban(wait, f"HTTP 418: {_snippet(body, 120)}", url, context)
        if status == 429:
            return Retry(
                f"HTTP 429: {_snippet(body, 120)}",
                wait=parse_retry_after(response.headers),
                rate_limited=True,
            )
        if status >= 500 or status == 408:
            return Retry(
                f"HTTP {status}: {_snippet(body)}", wait=parse_retry_after(response.headers)
            )
        if not 200 <= status < 300:
            raise self._error(f"HTTP {status}: {_snippet(body)}", url, context, status=status)
        try:
            parsed = json.loads(
                body.decode("utf-8"),
                parse_constant=_reject_constant,
                parse_float=str if exact_numbers else float,
            )
        except ValueError as exc:
            # Truncated or not JSON at all: most likely a proxy or connection hiccup.
            return Retry(
                f"malformed JSON in HTTP {status} ({exc}; body starts {_snippet(body, 60)!r})"
            )
        if check is not None:
            verdict = check(parsed)
            if verdict is not None:
                return verdict
        return parsed

"""The HTTP source framework against a fake API: retries, Retry-After, 200-errors, bans and the
rate limit shared by processes (real Redis)."""

from __future__ import annotations

import email.utils
import multiprocessing
import time
from typing import Any

import pytest
import redis

from sluice.producers.http_client import HttpApi, Retry, parse_retry_after
from sluice.producers.rate_limit import Budget, SharedRateLimiter
from sluice.shared.errors import ApiBannedError, HttpSourceError
from tests.fakes.market_server import FakeMarket

KLINES = {"symbol": "BTCUSDT", "interval": "1m", "startTime": 0, "endTime": 600_000, "limit": 5}


def api(fake: FakeMarket, redis_url: str, name: str = "test", **kw: Any) -> HttpApi:
    limiter = SharedRateLimiter(redis.Redis.from_url(redis_url), name, [Budget(100, 1)])
    kw.setdefault("max_attempts", 4)
    return HttpApi(api=name, base_url=fake.base_url, limiter=limiter, **kw)


def test_parse_retry_after_seconds_date_ms_and_reset() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "3"}, now) == 3.0
    date = email.utils.formatdate(now + 5, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now) == pytest.approx(5, abs=1)
    assert parse_retry_after({"retry-after-ms": "1500"}, now) == 1.5
    assert parse_retry_after({"x-ratelimit-reset": "2023-11-14 22:13:30 +0000"}, now) == 10.0
    assert parse_retry_after({}, now) is None


def test_429_with_retry_after_seconds_then_success(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next(
            "status",
            status=429,
            headers={"Retry-After": "1"},
            body='{"code":-1003,"msg":"Too much request weight used"}',
        )
        t0 = time.monotonic()
        body = api(fake, redis_url).get_json("/api/v3/klines", KLINES)
        assert len(body) == 5
        assert time.monotonic() - t0 >= 0.9  # the wait was honoured
        assert len(fake.requests) == 2


def test_429_with_http_date_and_without_header(redis_url: str) -> None:
    with FakeMarket() as fake:
        date = email.utils.formatdate(time.time() + 1, usegmt=True)
        fake.fail_next("status", status=429, headers={"Retry-After": date})
        fake.fail_next("status", status=429, body='{"status":{"error_code":429}}')
        client = api(fake, redis_url, rate_limit_fallback=0.5)
        assert len(client.get_json("/api/v3/klines", KLINES)) == 5
        assert len(fake.requests) == 3


def test_5xx_html_and_truncated_json_are_retried(redis_url: str) -> None:
    slept: list[float] = []
    with FakeMarket() as fake:
        fake.fail_next(
            "status",
            status=502,
            body="<html><h1>502 Bad Gateway</h1></html>",
            content_type="text/html",
        )
        fake.fail_next("truncated")
        fake.fail_next("body", body="")
        client = api(fake, redis_url, sleep=slept.append)
        assert len(client.get_json("/api/v3/klines", KLINES)) == 5
        assert len(fake.requests) == 4 and len(slept) == 3


def test_gives_up_after_max_attempts_with_context(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next("status", count=4, status=503, body="<html>down</html>")
        client = api(fake, redis_url, sleep=lambda s: None)
        with pytest.raises(HttpSourceError) as info:
            client.get_json("/api/v3/klines", KLINES, context={"source": "s", "partition": "p"})
        assert info.value.transient
        text = str(info.value)
        assert "gave up after 4" in text and "partition=p" in text and "/api/v3/klines" in text
        assert "startTime" not in text  # no query string (it may hold a key)


def test_4xx_is_permanent_and_not_retried(redis_url: str) -> None:
    with FakeMarket() as fake:
        with pytest.raises(HttpSourceError) as info:
            api(fake, redis_url).get_json("/api/v3/klines", {**KLINES, "interval": "7m"})
        assert info.value.status == 400 and not info.value.transient
        assert len(fake.requests) == 1


def test_error_inside_200_permanent_and_rate_limit_retried(redis_url: str) -> None:
    def check(body: Any) -> Retry | None:
        if body.get("Response") == "Error":
            if body.get("Type") == 99:
                return Retry("rate limited", rate_limited=True, wait=0.2)
            raise HttpSourceError(f"error inside 200: {body['Message']}")
        return None

    with FakeMarket() as fake:
        client = api(fake, redis_url)
        with pytest.raises(HttpSourceError, match="fsym param seems to be missing"):
            client.get_json("/data/v2/histohour", {"tsym": "USD"}, check=check)
        fake.fail_next(
            "body",
            body='{"Response":"Error","Message":"You are over your rate '
            'limit please upgrade your account!","Type":99,"Data":{}}',
        )
        body = client.get_json("/data/v2/histohour", {"fsym": "BTC", "tsym": "USD"}, check=check)
        assert body["Response"] == "Success"


def test_418_bans_the_api_for_every_client_until_it_ends(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next(
            "status",
            status=418,
            headers={"Retry-After": "2"},
            body='{"code":-1003,"msg":"Way too much request weight used; IP banned"}',
        )
        first = api(fake, redis_url, name="binance")
        with pytest.raises(ApiBannedError, match="banned for 2s"):
            first.get_json("/api/v3/klines", KLINES)
        # Another client (another process, another machine) does not even call.
        other = api(fake, redis_url, name="binance")
        with pytest.raises(ApiBannedError, match="not calling it"):
            other.get_json("/api/v3/klines", KLINES)
        assert len(fake.requests) == 1
        time.sleep(2.1)
        assert len(other.get_json("/api/v3/klines", KLINES)) == 5


def test_secrets_are_redacted_from_errors(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next("status", status=401, body='{"message":"bad key sk-SECRET-123"}')
        client = api(
            fake,
            redis_url,
            headers={"authorization": "Apikey sk-SECRET-123"},
            secrets=("sk-SECRET-123",),
        )
        with pytest.raises(HttpSourceError) as info:
            client.get_json("/api/v3/klines", KLINES)
        assert "sk-SECRET-123" not in str(info.value) and "[redacted]" in str(info.value)
        assert fake.requests[0].headers["authorization"] == "Apikey sk-SECRET-123"


def _calls(base_url: str, redis_url: str, n: int) -> None:
    limiter = SharedRateLimiter(redis.Redis.from_url(redis_url), "shared", [Budget(5, 1.0)])
    client = HttpApi(api="shared", base_url=base_url, limiter=limiter)
    for _ in range(n):
        client.get_json("/api/v3/klines", KLINES)


def test_two_processes_share_one_rate_limit(redis_url: str) -> None:
    with FakeMarket() as fake:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_calls, args=(fake.base_url, redis_url, 8)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        times = sorted(r.at for r in fake.requests)
    assert len(times) == 16
    # Never more than 5 in any rolling second (a little slack for the wire).
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 0.9) <= 5
    assert times[-1] - times[0] >= 2.0  # 16 calls at 5/s need at least three windows

"""The HTTP client's bounds on one call, against the fake market API: a total deadline (a body
trickled byte by byte is cut off and retried) and a size limit (an oversized body is refused
without being held in memory, permanently)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest
import redis

from sluice.producers.http_client import HttpApi
from sluice.producers.rate_limit import Budget, SharedRateLimiter
from sluice.shared.errors import HttpSourceError
from tests.fakes.market_server import FakeMarket

KLINES = {"symbol": "BTCUSDT", "interval": "1m", "startTime": 0, "endTime": 600_000, "limit": 5}
MIB = 1024 * 1024


def api(fake: FakeMarket, redis_url: str, **kw: Any) -> HttpApi:
    limiter = SharedRateLimiter(redis.Redis.from_url(redis_url), "limits", [Budget(100, 1)])
    kw.setdefault("max_attempts", 3)
    kw.setdefault("sleep", lambda _s: None)
    return HttpApi(api="limits", base_url=fake.base_url, limiter=limiter, **kw)


@contextmanager
def peak_rss_growth() -> Iterator[Callable[[], int]]:
    """Samples this process's resident memory while the block runs; yields a function giving
    the peak growth over the start, in bytes."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield lambda: peak[0] - base
    finally:
        done.set()
        t.join()


def test_a_trickled_body_is_cut_at_the_total_deadline_and_retried(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next("trickle", rate=100)  # ~700 bytes: 7 s at this rate
        client = api(fake, redis_url, timeout=(1.0, 1.0), total_timeout=1.0)
        t0 = time.monotonic()
        body = client.get_json("/api/v3/klines", KLINES)
        elapsed = time.monotonic() - t0
    assert len(body) == 5  # the retry got the whole answer
    assert len(fake.requests) == 2 and client.calls == 2
    # Each recv got bytes well within the read timeout: only the total deadline stops it.
    assert 0.9 <= elapsed < 2.5


def test_a_body_trickled_on_every_attempt_is_a_transient_error(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next("trickle", count=3, rate=50)
        client = api(fake, redis_url, total_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(HttpSourceError) as info:
            client.get_json("/api/v3/klines", KLINES)
        assert time.monotonic() - t0 < 3.0
    assert info.value.transient
    assert "gave up after 3 attempts" in str(info.value)
    assert "total_timeout (0.5s" in str(info.value)


def test_a_late_answer_counts_against_the_total_deadline(redis_url: str) -> None:
    with FakeMarket() as fake:
        fake.fail_next("delay", delay=1.5)
        client = api(fake, redis_url, timeout=(5.0, 30.0), total_timeout=0.5)
        t0 = time.monotonic()
        assert len(client.get_json("/api/v3/klines", KLINES)) == 5
        assert time.monotonic() - t0 < 1.4  # did not wait the 1.5 s for the first answer
    assert len(fake.requests) == 2


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-length"])
def test_an_oversized_body_is_refused_unread_and_not_retried(
    redis_url: str, send_length: bool
) -> None:
    with FakeMarket() as fake:
        fake.fail_next("oversized", size=50_000_000, send_length=send_length)
        client = api(fake, redis_url, max_response_bytes=MIB)
        t0 = time.monotonic()
        with peak_rss_growth() as growth, pytest.raises(HttpSourceError) as info:
            client.get_json("/api/v3/klines", KLINES, context={"partition": "BTCUSDT"})
        assert time.monotonic() - t0 < 5
        grew = growth()
    err = info.value
    assert not err.transient and err.status == 200
    text = str(err)
    assert "larger than max_response_bytes (1.0 MiB)" in text and "partition=BTCUSDT" in text
    assert ("Content-Length 50000000" in text) == send_length
    assert len(fake.requests) == 1  # permanent: the same request gets the same answer
    assert grew < 20 * MIB, f"memory grew {grew / MIB:.0f} MiB reading a refused body"


def test_answers_within_the_limits_reuse_the_pooled_connection(redis_url: str) -> None:
    with FakeMarket() as fake:
        client = api(fake, redis_url, max_response_bytes=64 * 1024, total_timeout=5)
        for _ in range(3):
            assert len(client.get_json("/api/v3/klines", KLINES)) == 5
    assert client.calls == 3

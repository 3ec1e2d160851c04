"""ACE IoT and CoinGecko adapters against the fake market API: exact requests, pagination, the
ACE cursor that does not advance, duplicates, CoinGecko's unaligned points, 429 without
Retry-After and the permanent 401/10012; and an end-to-end run into both sinks."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from sluice.ops.workers import WorkerPool
from sluice.producers.http_source import HttpSource, floor_time
from sluice.producers.produce import run_source
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.errors import HttpSourceError
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket, cap, price
from tests.helpers import drain, pg_scalar

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]
NOW = datetime(2024, 3, 1, 12, 30, 15, tzinfo=UTC)
POINTS = ["demo/site/ahu1/damper", "demo/site/ahu1/temp"]


def config(base_url: str, *, start: str, cg_start: str | None = None, page_size: int = 3) -> str:
    return f"""
[sources.ace]
kind = "aceiot"
base_url = "{base_url}"
api_key_env = "TEST_ACE_KEY"
site = "demo_site"
window_seconds = 3600
page_size = {page_size}
start = "{start}"
lookback_seconds = 0
max_batches = 100

[sources.cg]
kind = "coingecko"
base_url = "{base_url}"
api_key_env = "TEST_CG_KEY"
coins = ["bitcoin"]
vs_currency = "usd"
window_days = 1
start = "{cg_start or start}"
lookback_seconds = 0
max_batches = 100
rate_limit_fallback_seconds = 0.2
"""


@pytest.fixture
def fake() -> Iterator[FakeMarket]:
    with FakeMarket() as f:
        yield f


def open_http(env: Env, fake: FakeMarket, name: str, **kw: str) -> HttpSource:
    env.vars.update(TEST_ACE_KEY=fake.ace_key, TEST_CG_KEY="cg-demo-key")
    env.write_config(config(fake.base_url, **kw))  # type: ignore[arg-type]
    source = open_source(Settings.load(env.vars), name)
    assert isinstance(source, HttpSource)
    source.now = lambda: NOW
    return source


def test_ace_exact_request_and_pagination(env: Env, fake: FakeMarket) -> None:
    source = open_http(env, fake, "ace", start="2024-03-01T10:00:00")
    try:
        pages = list(source.pages(None, 10))
    finally:
        source.close()
    # 10:00-11:00, 11:00-12:00, 12:00-12:30 (closed 5-minute buckets): 2 points every 5 min.
    assert [len(p.rows) for p in pages] == [24, 24, 12]
    first = fake.requests[0]
    assert first.path == "/sites/demo_site/timeseries/paginated"
    assert first.query == {
        "start_time": "2024-03-01T10:00:00Z",
        "end_time": "2024-03-01T11:00:00Z",
        "page_size": "3",
        "raw_data": "false",
    }
    assert first.headers["Authorization"] == f"Bearer {fake.ace_key}"
    assert "cursor" in fake.requests[1].query
    # 26 samples (end_time is inclusive on the server) in pages of 3: 9 calls for the window.
    assert sum(1 for r in fake.requests if r.query["start_time"].startswith("2024-03-01T10")) == 9
    rows = [r for p in pages for r in p.rows]
    assert rows[0] == ["demo_site", POINTS[0], "2024-03-01T10:00:00Z", f"{price(1709287200):.1f}"]
    assert all(isinstance(r[3], str) for r in rows)
    assert len({(r[1], r[2]) for r in rows}) == len(rows) == 60
    assert source.anomalies == []
    assert [p.ack["end"] for p in pages] == [
        "2024-03-01T11:00:00Z",
        "2024-03-01T12:00:00Z",
        "2024-03-01T12:30:00Z",
    ]


def test_ace_duplicates_across_pages_are_dropped(env: Env, fake: FakeMarket) -> None:
    fake.ace_overlap = 1  # each page repeats the previous page's last sample
    source = open_http(env, fake, "ace", start="2024-03-01T10:00:00")
    try:
        rows = [r for p in source.pages(None, 10) for r in p.rows]
    finally:
        source.close()
    assert len(rows) == len({(r[1], r[2]) for r in rows}) == 60


@pytest.mark.parametrize(
    ("bug", "why"), [("stuck", "did not advance"), ("null_cursor", "null next_cursor")]
)
def test_ace_bad_cursor_stops_the_window_and_records_it(
    env: Env, fake: FakeMarket, bug: str, why: str
) -> None:
    fake.ace_bug = bug
    source = open_http(env, fake, "ace", start="2024-03-01T10:00:00")
    try:
        pages = list(source.pages(None, 10))
    finally:
        source.close()
    # Page 1 (10:00, 10:00, 10:05), page 2 (10:05, 10:10, 10:10), then the bad cursor: the
    # window is complete up to 10:10 only, and the partition stops for this run.
    assert len(fake.requests) == 2
    assert len(pages) == 1
    assert pages[0].ack["end"] == "2024-03-01T10:10:00Z"
    assert [r[2] for r in pages[0].rows] == ["2024-03-01T10:00:00Z"] * 2 + [
        "2024-03-01T10:05:00Z"
    ] * 2
    assert len(source.anomalies) == 1 and why in source.anomalies[0]

    # A run through run_source succeeds and records the anomaly in source_runs.error.
    ctx = app.configure(Settings.load(env.vars))
    fake.requests.clear()
    summary = run_source(ctx, "ace")
    assert summary.status == "ok" and summary.pages == 1
    assert summary.error is not None and why in summary.error
    error = pg_scalar(env.pg_url, "SELECT error FROM source_runs WHERE source = 'ace'")
    assert isinstance(error, str) and error.startswith("anomaly:") and why in error
    assert len(fake.requests) == 2  # never loops


def test_coingecko_request_unaligned_points_and_chunk_edges(env: Env, fake: FakeMarket) -> None:
    real_now = floor_time(datetime.now(UTC), timedelta(hours=1))
    start = real_now - timedelta(days=2, hours=6)
    source = open_http(env, fake, "cg", start=start.isoformat())
    source.now = lambda: real_now + timedelta(minutes=20)
    try:
        pages = list(source.pages(None, 10))
    finally:
        source.close()
    assert len(pages) == 3  # 1-day windows: 24 h, 24 h, 6 h
    first = fake.requests[0]
    assert first.path == "/coins/bitcoin/market_chart/range"
    assert first.query == {
        "vs_currency": "usd",
        "from": str(int(start.timestamp())),
        "to": str(int((start + timedelta(days=1)).timestamp())),
    }
    assert first.headers["x-cg-demo-api-key"] == "cg-demo-key"
    rows = [r for p in pages for r in p.rows]
    hours = [r[3] for r in rows]
    assert len(hours) == len(set(hours)) == 54  # no hour twice across chunk edges
    assert all(h.endswith(":00:00Z") for h in hours)  # bucketed to the hour
    t0 = int(start.timestamp())
    # The hour's first point, not the later one in the same hour; its market cap beside it;
    # both as the JSON numbers' literal text.
    assert rows[0] == [
        *("coingecko", "bitcoin/usd", "1h", hours[0]),
        *(None, None, None, str(price(t0))),  # open, high, low, close
        *(None, None, str(cap(t0)), None),  # volume, quote_volume, market_cap, trades
    ]


def test_coingecko_429_without_retry_after_is_retried(env: Env, fake: FakeMarket) -> None:
    source = open_http(env, fake, "cg", start="2024-03-01T00:00:00")
    fake.fail_next(
        "status",
        status=429,
        body='{"status":{"error_code":429,"error_message":"You\'ve exceeded the Rate Limit."}}',
    )
    try:
        end = floor_time(datetime.now(UTC), timedelta(hours=1))
        rows = source.fetch("bitcoin", end - timedelta(hours=3), end)
    finally:
        source.close()
    assert len(rows) == 3
    assert len(fake.requests) == 2


def test_coingecko_history_limit_is_permanent(env: Env, fake: FakeMarket) -> None:
    source = open_http(env, fake, "cg", start="2024-03-01T00:00:00")
    try:
        end = floor_time(datetime.now(UTC), timedelta(hours=1)) - timedelta(days=400)
        with pytest.raises(HttpSourceError) as err:
            source.fetch("bitcoin", end - timedelta(days=1), end)
    finally:
        source.close()
    assert err.value.status == 401 and not err.value.transient
    assert "10012" in str(err.value) and "365 days" in str(err.value)
    assert len(fake.requests) == 1  # not retried


def test_end_to_end_ace_and_coingecko_into_both_sinks(env: Env, fake: FakeMarket) -> None:
    now = datetime.now(UTC)
    ace_start = floor_time(now - timedelta(hours=3), timedelta(hours=1))
    cg_start = floor_time(now - timedelta(days=2), timedelta(hours=1))
    fake.ace_overlap = 1
    env.vars.update(TEST_ACE_KEY=fake.ace_key, TEST_CG_KEY="cg-demo-key")
    env.write_config(
        config(
            fake.base_url,
            start=ace_start.isoformat(),
            cg_start=cg_start.isoformat(),
            page_size=50,
        )
    )
    fake.fail_next("status", status=503, body="<html>busy</html>", content_type="text/html")
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    pool = WorkerPool(env.vars, env.dir / "logs")
    try:
        pool.start("pg", PG_QUEUES, 2)
        pool.start_sqlite_writer()
        for name in ("ace", "cg"):
            drain(ctx, name)
    finally:
        pool.stop()
    ace_until = floor_time(datetime.now(UTC), timedelta(minutes=5))
    samples = 2 * int((ace_until - ace_start).total_seconds() // 300)
    cg_hours = int((floor_time(datetime.now(UTC), timedelta(hours=1)) - cg_start).total_seconds())
    cg_hours //= 3600
    lite = sqlite3.connect(env.sqlite_path)
    try:
        n_lite = lite.execute("SELECT count(*) FROM timeseries").fetchone()[0]
        cg_lite = lite.execute(
            "SELECT count(*) FROM historical_prices WHERE source = 'coingecko'"
        ).fetchone()[0]
    finally:
        lite.close()
    n_pg = pg_scalar(env.pg_url, "SELECT count(*) FROM timeseries")
    assert isinstance(n_pg, int)
    distinct = pg_scalar(
        env.pg_url, 'SELECT count(DISTINCT (point_name, "timestamp")) FROM timeseries'
    )
    # A 5-minute boundary may pass between the run and this check: allow one bucket.
    assert n_pg == distinct == n_lite
    assert samples - 2 <= n_pg <= samples
    cg_pg = pg_scalar(
        env.pg_url,
        "SELECT count(DISTINCT \"timestamp\") FROM historical_prices WHERE source = 'coingecko'",
    )
    assert isinstance(cg_pg, int)
    assert cg_hours - 1 <= cg_pg <= cg_hours and cg_lite == cg_pg

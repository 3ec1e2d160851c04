"""Binance and CryptoCompare adapters against the fake market API: what they send, cursors,
lookback, acknowledgement, and an end-to-end run through real workers into both sinks."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from sluice.ops.workers import WorkerPool
from sluice.producers.cursors import CursorStore
from sluice.producers.http_source import HttpSource, floor_time
from sluice.producers.produce import run_source
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.database import postgres_engine
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import StateStore
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket
from tests.helpers import drain, pg_scalar

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]
NOW = datetime(2024, 3, 1, 12, 30, 15, tzinfo=UTC)


def config(base_url: str, *, start: str, lookback: float = 600, limit: int = 24) -> str:
    return f"""
[sources.bn]
kind = "binance"
base_url = "{base_url}"
symbols = ["BTCUSDT", "ETHUSDT"]
interval = "1h"
limit = {limit}
start = "{start}"
lookback_seconds = {lookback}
max_batches = 100

[sources.cc]
kind = "cryptocompare"
base_url = "{base_url}"
pairs = ["BTC/USD"]
endpoint = "histohour"
limit = {limit - 1}
start = "{start}"
lookback_seconds = {lookback}
max_batches = 100
"""


def open_http(settings: Settings, name: str) -> HttpSource:
    source = open_source(settings, name)
    assert isinstance(source, HttpSource)
    return source


@pytest.fixture
def fake() -> Iterator[FakeMarket]:
    with FakeMarket() as f:
        yield f


def test_binance_sends_exact_params_and_moves_cursor_only_on_ack(
    env: Env, fake: FakeMarket
) -> None:
    env.write_config(config(fake.base_url, start="2024-03-01T00:00:00Z"))
    source = open_http(Settings.load(env.vars), "bn")
    source.now = lambda: NOW
    try:
        pages = list(source.pages(None, 10))
        # 12 closed hours (00:00..11:00) per symbol, in one window each (limit 24).
        assert [len(p.rows) for p in pages] == [12, 12]
        q = fake.requests[0].query
        assert fake.requests[0].path == "/api/v3/klines"
        assert q == {
            "symbol": "BTCUSDT",
            "interval": "1h",
            "startTime": "1709251200000",
            "endTime": str(1709294400000 - 1),
            "limit": "24",
        }
        assert "X-MBX-TIME-UNIT" not in fake.requests[0].headers
        assert pages[0].rows[0][:4] == ["binance", "BTCUSDT", "1h", "2024-03-01T00:00:00Z"]
        cursors = CursorStore(StateStore(postgres_engine(env.pg_url)))
        assert cursors.get_all("bn") == {}  # nothing committed yet
        source.acknowledge(pages[1].ack)
        source.acknowledge(pages[0].ack)
        end = datetime(2024, 3, 1, 12, tzinfo=UTC)
        assert cursors.get_all("bn") == {"BTCUSDT": end, "ETHUSDT": end}
        # The next run re-reads the lookback buffer (10 minutes, floored to the hour bar).
        fake.requests.clear()
        source.now = lambda: NOW + timedelta(hours=1)
        again = list(source.pages(None, 10))
        assert [len(p.rows) for p in again] == [2, 2]
        assert fake.requests[0].query["startTime"] == str(
            int((end - timedelta(hours=1)).timestamp() * 1000)
        )
    finally:
        source.close()


def test_out_of_order_ack_never_skips_a_lost_window(env: Env, fake: FakeMarket) -> None:
    env.write_config(config(fake.base_url, start="2024-03-01T00:00:00Z", limit=4))
    source = open_http(Settings.load(env.vars), "bn")
    source.now = lambda: NOW
    try:
        pages = [p for p in source.pages(None, 100) if p.ack["partition"] == "BTCUSDT"]
        assert len(pages) == 3
        source.acknowledge(pages[0].ack)
        source.acknowledge(pages[2].ack)  # page 1 was lost
        cursors = CursorStore(StateStore(postgres_engine(env.pg_url)))
        assert cursors.get_all("bn")["BTCUSDT"] == datetime(2024, 3, 1, 4, tzinfo=UTC)
        # A later run (nothing in flight) fetches from there again.
        fake.requests.clear()
        list(source.pages([], 1))
        assert fake.requests[0].query["startTime"] == str(
            int(datetime(2024, 3, 1, 3, tzinfo=UTC).timestamp() * 1000)
        )
    finally:
        source.close()


def test_in_flight_windows_are_not_fetched_again(env: Env, fake: FakeMarket) -> None:
    env.write_config(config(fake.base_url, start="2024-03-01T00:00:00Z", limit=4))
    source = open_http(Settings.load(env.vars), "bn")
    source.now = lambda: NOW
    try:
        first = list(source.pages(None, 2))
        in_flight = [p.last_key for p in first]
        fake.requests.clear()
        rest = list(source.pages(in_flight, 100))
        starts = {(p.ack["partition"], p.ack["start"]) for p in rest}
        assert not starts & {(p.ack["partition"], p.ack["start"]) for p in first}
        assert sum(len(p.rows) for p in first + rest) == 24
    finally:
        source.close()


def test_cryptocompare_pages_backwards_drops_zero_candles(env: Env) -> None:
    listed = int(datetime(2024, 3, 1, 5, tzinfo=UTC).timestamp())
    with FakeMarket(listed_from=listed) as fake:
        env.write_config(config(fake.base_url, start="2024-02-29T00:00:00Z", limit=6))
        source = open_http(Settings.load(env.vars), "cc")
        source.now = lambda: NOW
        try:
            rows = [r for p in source.pages(None, 100) for r in p.rows]
            times = [r[3] for r in rows]
            assert times[0] == "2024-03-01T05:00:00Z" and times[-1] == "2024-03-01T11:00:00Z"
            assert len(times) == len(set(times)) == 7
            q = fake.requests[-1].query
            assert fake.requests[-1].path == "/data/v2/histohour"
            assert q["fsym"] == "BTC" and q["tsym"] == "USD" and "api_key" not in q
        finally:
            source.close()


def test_end_to_end_both_sinks_no_gaps_no_duplicates(env: Env, fake: FakeMarket) -> None:
    start = floor_time(datetime.now(UTC) - timedelta(days=2), timedelta(hours=1))
    env.write_config(config(fake.base_url, start=start.isoformat(), lookback=0))
    fake.fail_next("status", status=503, body="<html>busy</html>", content_type="text/html")
    fake.fail_next("status", status=429, headers={"Retry-After": "1"})
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    # Enqueued but not committed: no cursor yet.
    assert run_source(ctx, "bn").status == "ok"
    assert pg_scalar(env.pg_url, "SELECT count(*) FROM source_progress") == 0
    pool = WorkerPool(env.vars, env.dir / "logs")
    try:
        pool.start("pg", PG_QUEUES, 2)
        pool.start_sqlite_writer()
        for name in ("bn", "cc"):
            drain(ctx, name)
    finally:
        pool.stop()
    end = floor_time(datetime.now(UTC), timedelta(hours=1))
    hours = int((end - start).total_seconds() // 3600)
    expected = {("binance", "BTCUSDT"), ("binance", "ETHUSDT"), ("cryptocompare", "BTC/USD")}
    lite = sqlite3.connect(env.sqlite_path)
    try:
        for src, sym in expected:
            where = f"source = '{src}' AND symbol = '{sym}'"
            n_pg = pg_scalar(
                env.pg_url,
                f'SELECT count(DISTINCT "timestamp") FROM historical_prices WHERE {where}',
            )
            total = pg_scalar(env.pg_url, f"SELECT count(*) FROM historical_prices WHERE {where}")
            assert n_pg == total == hours, (src, sym)
            (n_lite,) = lite.execute(
                f"SELECT count(*) FROM historical_prices WHERE {where}"
            ).fetchone()
            assert n_lite == hours
        assert lite.execute("SELECT count(*) FROM data_coverage").fetchone()[0] == 3
        assert lite.execute("SELECT count(*) FROM latest_prices").fetchone()[0] == 3
    finally:
        lite.close()
    assert pg_scalar(env.pg_url, "SELECT count(*) FROM data_coverage") == 3
    assert (
        pg_scalar(
            env.pg_url,
            "SELECT count(*) FROM source_progress WHERE cursor = '"
            + end.strftime("%Y-%m-%dT%H:%M:%SZ")
            + "'",
        )
        == 3
    )
    assert (
        pg_scalar(
            env.pg_url,
            "SELECT count(*) FROM ingestion_performance WHERE stream = 'historical_prices'",
        )
        == 2
    )

"""`sluice backfill`: a past range through real workers into both sinks, interrupted and resumed
without gaps, repeats or a live cursor moved backwards."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from ops.backfill import progress_key, run_backfill
from ops.status import total_depth
from ops.workers import WorkerPool
from producers.cursors import CursorStore
from shared.celery_app import app
from shared.context import Context
from shared.database import postgres_engine
from shared.migrations import migrate_sqlite
from shared.settings import Settings
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket
from tests.helpers import pg_scalar
from tests.test_cli import sluice
from tests.test_http_sources import PG_QUEUES, config

FROM = datetime(2024, 1, 1, tzinfo=UTC)
TO = datetime(2024, 1, 4, tzinfo=UTC)  # 3 days: 3 windows of 24 hourly bars per symbol
LIVE = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture
def fake() -> Iterator[FakeMarket]:
    with FakeMarket() as f:
        yield f


def klines_starts(fake: FakeMarket) -> list[tuple[str, int]]:
    return [
        (r.query["symbol"], int(r.query["startTime"]))
        for r in fake.requests
        if r.path == "/api/v3/klines"
    ]


def wait_committed(ctx: Context, source: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ctx.progress.in_flight(source) == 0 and total_depth(ctx.redis) == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"backfill pages not committed within {timeout}s")


def test_backfill_interrupted_and_resumed_lands_every_bar_once(env: Env, fake: FakeMarket) -> None:
    env.write_config(config(fake.base_url, start=LIVE.isoformat(), lookback=0))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    cursors = CursorStore(postgres_engine(env.pg_url))
    cursors.set("bn", "BTCUSDT", LIVE)  # a live cursor well after the range
    said: list[str] = []

    first = run_backfill(ctx, "bn", FROM, TO, said.append, max_windows=2)
    assert first.status == "stopped"
    assert (first.windows_total, first.windows_done, first.pages) == (6, 2, 2)
    first_requests = klines_starts(fake)
    assert len(first_requests) == 2
    assert said and "window 2/6" in said[-1]
    fake.requests.clear()

    pool = WorkerPool(env.vars, env.dir / "logs")
    try:
        pool.start("pg", PG_QUEUES, 2)
        pool.start("lite", ["ingest.sqlite"], 1)
        second = run_backfill(ctx, "bn", FROM, TO, said.append)
        assert second.status == "complete"
        assert (second.windows_done, second.windows_this_run, second.pages) == (6, 4, 4)
        # The resumed run asked the API only for the remaining windows.
        rest = klines_starts(fake)
        assert len(rest) == 4 and not set(rest) & set(first_requests)
        # Done: a third run fetches nothing.
        fake.requests.clear()
        third = run_backfill(ctx, "bn", FROM, TO, said.append)
        assert third.status == "complete" and third.windows_this_run == 0
        assert klines_starts(fake) == []
        wait_committed(ctx, "bn")
    finally:
        pool.stop()

    hours = int((TO - FROM).total_seconds() // 3600)
    lite = sqlite3.connect(env.sqlite_path)
    try:
        for sym in ("BTCUSDT", "ETHUSDT"):
            where = (
                f"source = 'binance' AND symbol = '{sym}'"
                f" AND \"timestamp\" >= '2024-01-01' AND \"timestamp\" < '2024-01-04'"
            )
            total = pg_scalar(env.pg_url, f"SELECT count(*) FROM historical_prices WHERE {where}")
            distinct = pg_scalar(
                env.pg_url,
                f'SELECT count(DISTINCT "timestamp") FROM historical_prices WHERE {where}',
            )
            assert total == distinct == hours, sym
            assert (
                pg_scalar(
                    env.pg_url, f"SELECT count(*) FROM historical_prices WHERE symbol = '{sym}'"
                )
                == hours
            )  # nothing outside the range
            (n_lite,) = lite.execute(
                f"SELECT count(*) FROM historical_prices WHERE symbol = '{sym}'"
            ).fetchone()
            assert n_lite == hours, sym
    finally:
        lite.close()
    # The live cursor did not move backwards, and none was created for the other symbol; the
    # backfill's own bookkeeping lives under another source name.
    assert cursors.get_all("bn") == {"BTCUSDT": LIVE}
    assert cursors.get_all("backfill:bn")[progress_key("ETHUSDT", FROM, TO)] == TO


def test_backfill_cli_json_and_progress(env: Env, fake: FakeMarket) -> None:
    env.write_config(config(fake.base_url, start=LIVE.isoformat()))
    args = ["backfill", "bn", "--from", "2024-01-01", "--to", "2024-01-02T00:00:00Z", "--json"]
    r = sluice(*args, "--max-windows", "1", env=env.vars, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "stopped" and doc["windows_done"] == 1 and doc["windows_total"] == 2
    assert "window 1/2" in r.stderr
    r = sluice(*args, env=env.vars, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "complete" and doc["windows_this_run"] == 1
    assert doc["records"] == 24
    assert len(klines_starts(fake)) == 2
    bad = sluice("backfill", "bn", "--from", "2024-01-02", "--to", "2024-01-01", env=env.vars)
    assert bad.returncode == 2 and "--to must be after --from" in bad.stderr

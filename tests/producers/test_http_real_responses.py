"""HTTP sources on real responses: what the APIs actually send when it is not the happy path.

- times in another unit (seconds for milliseconds) fail the window, not the run, and never move
  the cursor (a run or a backfill used to call that "no data" and jump to now);
- a null or unreadable field travels as it is (a dead letter names it) and a kline that cannot be
  placed becomes a dead letter itself, while the rest of the answer goes on;
- CryptoCompare's null close stays null, its zero-filled candles are still dropped;
- a permanent error (an unknown symbol) fails its partition only;
- a run is bounded in calls and in time, empty windows included;
- decimals keep the APIs' exact text, from fixture bodies in the APIs' shapes too (CryptoCompare,
  CoinGecko's market caps, ACE's pages);
- CryptoCompare's used-up daily quota bans the API until it resets instead of retrying.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from sluice.ops.backfill import progress_key, run_backfill
from sluice.ops.workers import WorkerPool
from sluice.producers.cryptocompare import quota_reset, rate_limit_retry
from sluice.producers.cursors import CursorStore
from sluice.producers.http_source import HttpSource, floor_time, iso_utc
from sluice.producers.produce import run_source
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn, postgres_engine
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import StateStore
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket
from tests.helpers import drain

FIXTURES = Path(__file__).parents[1] / "fixtures"  # bodies shaped as the APIs send them
PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]
HOUR = timedelta(hours=1)
NOW = datetime(2024, 3, 1, 12, 30, 15, tzinfo=UTC)  # for sources read without run_source


def config(base: str, start: str, **extra: object) -> str:
    """Two partitions per API, one window each from `start`; `extra` goes into every source."""
    more = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    return f"""
[sources.bn]
kind = "binance"
base_url = "{base}"
symbols = ["BTCUSDT", "ETHUSDT"]
interval = "1h"
limit = 24
start = "{start}"
lookback_seconds = 0
{more}
[sources.cc]
kind = "cryptocompare"
base_url = "{base}"
pairs = ["BTC/USD", "ETH/USD"]
endpoint = "histohour"
limit = 23
start = "{start}"
lookback_seconds = 0
{more}
[sources.cg]
kind = "coingecko"
base_url = "{base}"
coins = ["bitcoin", "ethereum"]
window_days = 1
start = "{start}"
lookback_seconds = 0
{more}
"""


@pytest.fixture
def fake() -> Iterator[FakeMarket]:
    with FakeMarket() as f:
        yield f


def recent() -> datetime:
    """Six closed hours ago: within CoinGecko's 365 days, and every fake serves it."""
    return floor_time(datetime.now(UTC), HOUR) - 6 * HOUR


def context(env: Env, text: str) -> Context:
    env.write_config(text)
    return app.configure(Settings.load(env.vars))


def cursors(env: Env) -> CursorStore:
    return CursorStore(StateStore(postgres_engine(env.pg_url)))


def opened(env: Env, name: str, now: datetime = NOW) -> HttpSource:
    source = open_source(Settings.load(env.vars), name)
    assert isinstance(source, HttpSource)
    source.now = lambda: now
    return source


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def pg_rows(env: Env, sql: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


# -- 1. times outside the window ---------------------------------------------------------------

UNITS = [
    ("bn", "s", "BTCUSDT", "ETHUSDT"),  # Binance open times in seconds, not milliseconds
    ("cc", "ms", "BTC/USD", "ETH/USD"),  # CryptoCompare candle times in milliseconds
    ("cg", "s", "bitcoin", "ethereum"),  # CoinGecko point times in seconds
]


@pytest.mark.parametrize(("name", "unit", "bad", "good"), UNITS, ids=[u[0] for u in UNITS])
def test_times_in_another_unit_fail_the_window_and_keep_the_cursor(
    env: Env, fake: FakeMarket, name: str, unit: str, bad: str, good: str
) -> None:
    ctx = context(env, config(fake.base_url, recent().isoformat()))
    fake.fail_at(0, "time_unit", unit=unit)  # the first partition's only window
    summary = run_source(ctx, name)
    assert summary.status == "partial", summary
    assert summary.error is not None and summary.error.startswith("failed: ")
    assert bad in summary.error and good not in summary.error
    assert "outside the span asked for" in summary.error
    assert "another unit" in summary.error
    # The other partition went on: its six closed hours are enqueued.
    assert (summary.pages, summary.records) == (1, 6)
    # The failed window did not count as "no data": no cursor moved (the other one waits for
    # its page to be committed).
    assert cursors(env).get_all(name) == {}
    # The next run asks for the same window again.
    first_bad = fake.requests[0]
    fake.requests.clear()
    assert run_source(ctx, name).status == "ok"
    again = [r for r in fake.requests if r.query == first_bad.query]
    assert len(again) == 1


def test_a_backfill_fails_the_partition_with_times_in_another_unit_instead_of_completing(
    env: Env, fake: FakeMarket
) -> None:
    start = recent() - timedelta(days=2)
    end = recent()
    ctx = context(env, config(fake.base_url, start.isoformat()))
    fake.fail_at(0, "time_unit", unit="s")
    summary = run_backfill(ctx, "bn", start, end)
    # A permanent error of that partition: listed, not raised; the other one went on.
    assert summary.status == "partial"
    assert [f["partition"] for f in summary.failed] == ["BTCUSDT"]
    assert "outside the span asked for" in summary.failed[0]["error"]
    book = cursors(env).get_all("backfill:bn")
    assert progress_key("BTCUSDT", start, end) not in book  # nothing counted as done
    assert book == {progress_key("ETHUSDT", start, end): end}
    assert cursors(env).get_all("bn") == {}


# -- 2. a null or unreadable kline field -------------------------------------------------------


def kline(t: datetime, close: Any = "101.50000000", volume: Any = "10.5", **kw: Any) -> list[Any]:
    return [
        ms(t), kw.get("open", "100.00000000"), "102.00000000", "99.00000000", close, volume,
        ms(t + HOUR) - 1, "1050.12345678", 7, "5.0", "500.0", "0",
    ]  # fmt: skip


def test_binance_null_and_unplaceable_klines_do_not_stop_the_rest(
    env: Env, fake: FakeMarket
) -> None:
    start = datetime(2024, 3, 1, 6, tzinfo=UTC)
    env.write_config(config(fake.base_url, start.isoformat()))
    h = [start + i * HOUR for i in range(6)]
    fake.fail_next(
        "body",
        body=json.dumps(
            [
                kline(h[0], close="819993474.31887912"),
                kline(h[1], close=None),  # required: a dead letter naming close
                kline(h[2], volume=None),  # optional: stored as NULL
                kline(h[3], open="n/a"),  # not a decimal: a dead letter naming open
                {"open_time": ms(h[4])},  # not an array
                [ms(h[4]), "1.0"],  # too short
                ["soon", *kline(h[4])[1:]],  # open time not a number
                kline(h[5]),
            ]
        ),
    )
    fake.fail_next("body", body=json.dumps([{"what": "not a kline"}]))  # all of ETHUSDT's answer
    source = opened(env, "bn")
    try:
        pages = list(source.pages(None, 10))
    finally:
        source.close()
    assert source.failures == []
    btc, eth = pages
    assert [r[3] for r in btc.rows] == [iso_utc(t) for t in (h[0], h[1], h[2], h[3], h[5])]
    assert btc.rows[0][4:] == [
        "100.00000000", "102.00000000", "99.00000000", "819993474.31887912", "10.5",
        "1050.12345678", None, 7,
    ]  # fmt: skip
    assert btc.rows[1][7] is None and btc.rows[2][8] is None and btc.rows[3][4] == "n/a"
    assert sorted(r.error.split(": ", 1)[1] for r in btc.rejected) == [
        "kline has 2 fields, expected 12",
        "kline is a JSON dict, not an array",
        "open time 'soon' is not a number",
    ]
    assert all("binance kline #" in r.error and "of BTCUSDT" in r.error for r in btc.rejected)
    assert {"open_time": ms(h[4])} in [r.item for r in btc.rejected]
    # A page of nothing but rejects is still a page: its letters must be stored before the
    # cursor moves past it.
    assert eth.rows == [] and [r.item for r in eth.rejected] == [{"what": "not a kline"}]


def test_binance_null_close_reaches_the_dead_letters_and_the_rest_postgresql(
    env: Env, fake: FakeMarket
) -> None:
    start = recent()
    end = start + 6 * HOUR
    text = config(fake.base_url, start.isoformat()).replace(
        '["BTCUSDT", "ETHUSDT"]', '["BTCUSDT"]', 1
    )
    ctx = context(env, text)
    migrate_sqlite(env.sqlite_path)
    h = [start + i * HOUR for i in range(6)]
    body = [kline(h[0], close="819993474.31887912"), kline(h[1], close=None)]
    body += [kline(t) for t in h[2:5]] + [[ms(h[5]), "broken"]]
    fake.fail_next("body", body=json.dumps(body))
    pool = WorkerPool(env.vars, env.dir / "logs")
    try:
        pool.start("pg", PG_QUEUES, 1)
        pool.start_sqlite_writer()
        drain(ctx, "bn")
    finally:
        pool.stop()
    stored = pg_rows(
        env, 'SELECT "timestamp", close::text FROM historical_prices ORDER BY "timestamp"'
    )
    assert [c for _, c in stored] == ["819993474.31887912"] + ["101.50000000"] * 3
    letters = pg_rows(env, "SELECT sink, error_message FROM failed_ingestions ORDER BY sink")
    sinks = [s for s, _ in letters]
    assert "source" in sinks  # the short kline
    assert any("close" in m and "required" in m for s, m in letters if s != "source")
    assert any("kline has 2 fields" in m for s, m in letters if s == "source")
    # Everything read was stored or dead-lettered: the cursor moved over the whole window.
    assert cursors(env).get_all("bn") == {"BTCUSDT": end}


def test_ace_samples_that_cannot_be_placed_are_rejected_and_the_rest_goes_on(
    env: Env, fake: FakeMarket
) -> None:
    env.vars["TEST_ACE_KEY"] = fake.ace_key
    env.write_config(
        f"""
[sources.ace]
kind = "aceiot"
base_url = "{fake.base_url}"
api_key_env = "TEST_ACE_KEY"
site = "demo_site"
window_seconds = 3600
start = "2024-03-01T11:00:00Z"
lookback_seconds = 0
"""
    )
    point = "demo/site/ahu1/temp"
    samples = [
        {"name": point, "value": "45.5", "time": "2024-03-01T11:05:00"},
        {"name": point, "value": "45.6", "time": "yesterday"},
        {"value": "45.7", "time": "2024-03-01T11:15:00"},
        "45.8",
        {"name": point, "value": None, "time": "2024-03-01T11:20:00Z"},
    ]
    fake.fail_next("body", body=json.dumps({"point_samples": samples, "has_more": False}))
    source = opened(env, "ace")
    try:
        page = next(iter(source.pages(None, 1)))
    finally:
        source.close()
    assert page.rows == [
        ["demo_site", point, "2024-03-01T11:05:00Z", "45.5"],
        ["demo_site", point, "2024-03-01T11:20:00Z", None],
    ]
    assert [r.item for r in page.rejected] == samples[1:4]
    assert "time 'yesterday' is not an ISO-8601 time" in page.rejected[0].error
    assert "sample has no point name" in page.rejected[1].error
    assert "sample is a JSON str, not an object" in page.rejected[2].error


def test_a_backfill_keeps_the_items_it_cannot_place(env: Env, fake: FakeMarket) -> None:
    """ops/backfill.py reads windows as a run does: the items that are not records travel in
    the window's page as dead letters, the window is not refused (tests/ops/test_backfill.py follows
    them into failed_ingestions)."""
    start = recent() - timedelta(days=1)
    end = start + timedelta(days=1)
    ctx = context(env, config(fake.base_url, start.isoformat()))
    fake.fail_next("body", body=json.dumps([kline(start), {"not": "a kline"}]))
    summary = run_backfill(ctx, "bn", start, end)
    assert summary.status == "complete" and summary.failed == []
    assert (summary.pages, summary.rejected) == (2, 1)  # BTCUSDT's page carries the reject
    assert summary.records == 1 + 24  # its one kline, and ETHUSDT's window
    assert cursors(env).get_all("backfill:bn") == {
        progress_key("BTCUSDT", start, end): end,
        progress_key("ETHUSDT", start, end): end,
    }


# -- 3. CryptoCompare nulls are not zeros ------------------------------------------------------


def test_cryptocompare_null_stays_null_and_zero_filled_candles_are_dropped(
    env: Env, fake: FakeMarket
) -> None:
    start = datetime(2024, 3, 1, 6, tzinfo=UTC)
    env.write_config(config(fake.base_url, start.isoformat()))
    t = [int((start + i * HOUR).timestamp()) for i in range(6)]

    def candle(at: int, **kw: Any) -> dict[str, Any]:
        c = {"time": at, "high": 101.5, "low": 99.25, "open": 100, "volumefrom": 12.5}
        c.update(volumeto=1250.75, close=100.5, conversionType="direct", conversionSymbol="")
        c.update(kw)
        return c

    zero = {"open": 0, "high": 0, "low": 0, "close": 0, "volumefrom": 0, "volumeto": 0}
    candles = [
        candle(t[0], **zero),  # before the pair existed
        candle(t[1], close=None),  # a missing close, not a zero
        candle(t[2], volumefrom=None, volumeto=None),
        candle(t[3], open=0, high=0, low=0, close=None),  # a null: not zero-filled
        candle(t[4], close=123.25),  # made more digits than a double keeps, below
        candle(t[5]),
    ]
    raw = json.dumps(
        {
            "Response": "Success",
            "Message": "",
            "HasWarning": False,
            "Type": 100,
            "RateLimit": {},
            "Data": {"Aggregated": False, "TimeFrom": t[0], "TimeTo": t[5], "Data": candles},
        }
    ).replace("123.25", "16679.570000000001000")
    fake.fail_next("body", body=raw)
    source = opened(env, "cc")
    try:
        rows = next(iter(source.pages(None, 1))).rows
    finally:
        source.close()
    by_time = {r[3]: r[4:10] for r in rows}  # open, high, low, close, volume, quote_volume
    stamp = [iso_utc(datetime.fromtimestamp(x, UTC)) for x in t]
    assert stamp[0] not in by_time
    assert by_time[stamp[1]] == [100, "101.5", "99.25", None, "12.5", "1250.75"]
    assert by_time[stamp[2]] == [100, "101.5", "99.25", "100.5", None, None]
    assert by_time[stamp[3]] == [0, 0, 0, None, "12.5", "1250.75"]
    assert by_time[stamp[4]][3] == "16679.570000000001000"
    assert len(rows) == 5


# -- 4. a permanent error fails its partition only ---------------------------------------------


def test_an_unknown_symbol_fails_its_partition_and_the_others_go_on(
    env: Env, fake: FakeMarket
) -> None:
    text = config(fake.base_url, recent().isoformat()).replace('"BTCUSDT"', '"NOSUCHCOIN"', 1)
    text = text.replace('["bitcoin", "ethereum"]', '["nosuchcoin", "ethereum"]', 1)
    ctx = context(env, text)
    fake.unknown = {"NOSUCHCOIN", "nosuchcoin"}
    for name, bad, why in [
        ("bn", "NOSUCHCOIN", 'HTTP 400: {"code": -1121, "msg": "Invalid symbol."}'),
        ("cg", "nosuchcoin", 'HTTP 404: {"error": "coin not found"}'),
    ]:
        fake.requests.clear()
        summary = run_source(ctx, name)
        assert summary.status == "partial", summary
        assert (summary.pages, summary.records) == (1, 6)  # the good partition's window
        assert summary.error is not None and bad in summary.error and why in summary.error
        assert len(fake.requests) == 2  # the 4xx was not retried


def test_a_source_whose_every_partition_fails_fails(env: Env, fake: FakeMarket) -> None:
    text = config(fake.base_url, recent().isoformat())
    ctx = context(env, text.replace('["BTCUSDT", "ETHUSDT"]', '["NOSUCHCOIN", "NOSUCHTOO"]'))
    fake.unknown = {"NOSUCHCOIN", "NOSUCHTOO"}
    summary = run_source(ctx, "bn")
    assert summary.status == "failed" and summary.pages == 0
    assert summary.error is not None and summary.error.startswith("every partition failed")
    assert "NOSUCHCOIN" in summary.error and "NOSUCHTOO" in summary.error


def test_an_oversized_answer_fails_its_partition(env: Env, fake: FakeMarket) -> None:
    ctx = context(env, config(fake.base_url, recent().isoformat(), max_response_bytes=65536))
    fake.fail_at(0, "oversized", size=5_000_000, send_length=False)
    summary = run_source(ctx, "bn")
    assert summary.status == "partial" and summary.records == 6
    assert summary.error is not None and "BTCUSDT" in summary.error
    assert "larger than max_response_bytes (65536 bytes)" in summary.error


def test_a_transient_error_after_the_retries_still_ends_the_run(env: Env, fake: FakeMarket) -> None:
    ctx = context(env, config(fake.base_url, recent().isoformat(), max_attempts=2))
    fake.fail_next(
        "status", count=2, status=503, body="<html>down</html>", content_type="text/html"
    )
    summary = run_source(ctx, "bn")
    assert summary.status == "failed" and summary.pages == 0
    assert summary.error is not None and "gave up after 2 attempts" in summary.error
    assert len(fake.requests) == 2  # ETHUSDT waits for the next run


# -- 5. a run's work is bounded, empty windows included -----------------------------------------


def minute_source(base: str, **bounds: object) -> str:
    more = "".join(f"{k} = {v}\n" for k, v in bounds.items())
    return f"""
[sources.bn1m]
kind = "binance"
base_url = "{base}"
symbols = ["BTCUSDT"]
interval = "1m"
limit = 1000
start = "2021-01-01T00:00:00Z"
lookback_seconds = 0
{more}"""


def test_empty_windows_count_toward_the_calls_a_run_may_make(env: Env, fake: FakeMarket) -> None:
    fake.listed_from = int(time.time()) - 7200  # nothing before two hours ago: every answer []
    ctx = context(env, minute_source(fake.base_url, max_calls_per_run=30))
    summary = run_source(ctx, "bn1m")
    assert (summary.status, summary.pages, summary.error) == ("ok", 0, None)
    assert len(fake.requests) == 30
    reached = datetime(2021, 1, 1, tzinfo=UTC) + 30 * 1000 * timedelta(minutes=1)
    assert cursors(env).get_all("bn1m") == {"BTCUSDT": reached}
    # The next run continues from there.
    fake.requests.clear()
    run_source(ctx, "bn1m")
    assert fake.requests[0].query["startTime"] == str(ms(reached))
    assert len(fake.requests) == 30


def test_a_run_stops_at_its_time_bound(env: Env, fake: FakeMarket) -> None:
    fake.listed_from = int(time.time()) - 7200
    ctx = context(env, minute_source(fake.base_url, max_run_seconds=1))
    fake.fail_next("delay", count=50, delay=0.3)
    t0 = time.monotonic()
    summary = run_source(ctx, "bn1m")
    assert time.monotonic() - t0 < 3
    assert (summary.status, summary.error) == ("ok", None)
    assert 3 <= len(fake.requests) <= 5
    assert "BTCUSDT" in cursors(env).get_all("bn1m")  # the empty windows read are done


# -- 7. exact decimals, from bodies shaped as the APIs send them (tests/fixtures) ----------------


def fixture(path: str) -> str:
    return (FIXTURES / path).read_text()


def literal_numbers(text: str) -> Any:
    return json.loads(text, parse_float=str)


def test_cryptocompare_histohour_keeps_every_number_as_sent(env: Env, fake: FakeMarket) -> None:
    raw = fixture("cryptocompare/histohour-ena-usd-limit23.json")
    data = literal_numbers(raw)["Data"]
    start = datetime.fromtimestamp(data["TimeFrom"], UTC)
    end = datetime.fromtimestamp(data["TimeTo"], UTC) + HOUR
    env.write_config(config(fake.base_url, start.isoformat()))  # limit = 23: 24 candles a call
    fake.fail_next("body", body=raw)
    source = opened(env, "cc", now=end + timedelta(minutes=5))
    try:
        rows = source.fetch("ENA/USD", start, end)
    finally:
        source.close()
    asked = fake.requests[0].query
    assert (asked["fsym"], asked["tsym"]) == ("ENA", "USD")
    assert asked["toTs"] == str(data["TimeTo"])
    assert asked["limit"] == "23"
    prices = ("open", "high", "low", "close")
    listed = [c for c in data["Data"] if any(c[f] != 0 for f in prices)]
    want = [
        [iso_utc(datetime.fromtimestamp(c["time"], UTC))]
        + [c[f] for f in (*prices, "volumefrom", "volumeto")]
        for c in listed
    ]
    assert [[r[3], *r[4:10]] for r in rows] == want
    # The 8 zero-filled candles (before the pair was listed) are dropped, every other is kept.
    assert len(data["Data"]) == 24 and len(rows) == 24 - 8 == len(listed)
    assert all(r[10] is None for r in rows)
    assert rows[1][8] == "2875401.6600000001" and rows[2][5] == 1  # as sent, not as a double


def test_coingecko_market_chart_keeps_prices_and_market_caps_as_sent(
    env: Env, fake: FakeMarket
) -> None:
    raw = fixture("coingecko/market-chart-range-pepe-eur-hourly.json")
    body = literal_numbers(raw)
    first = datetime.fromtimestamp(body["prices"][0][0] / 1000, UTC)
    start = floor_time(first, HOUR)
    end = floor_time(datetime.fromtimestamp(body["prices"][-1][0] / 1000, UTC), HOUR) + HOUR
    env.write_config(
        config(fake.base_url, start.isoformat()).replace("window_days = 1", "window_days = 3")
    )
    fake.fail_next("body", body=raw)
    source = opened(env, "cg", now=end + timedelta(minutes=5))
    try:
        rows = source.fetch("pepe", start, end)
    finally:
        source.close()
    # Per hour, the first point's price and the market cap given at the same time.
    want: dict[str, tuple[Any, Any]] = {}
    caps = dict((t, v) for t, v in body["market_caps"])
    for t, price in body["prices"]:
        hour = iso_utc(floor_time(datetime.fromtimestamp(t / 1000, UTC), HOUR))
        want.setdefault(hour, (price, caps[t]))
    assert {r[3]: (r[7], r[10]) for r in rows} == want
    assert rows[0][7] == "9.03357654956749e-06" and rows[0][10] == "0.0"  # as sent
    assert all(r[4] is None and r[8] is None for r in rows)  # no OHLC, no period volume


def test_ace_pages_keep_values_and_times_as_sent(env: Env, fake: FakeMarket) -> None:
    """Two pages of `/timeseries/paginated`: the second asked for with the first's cursor; string
    values (and a null) kept as sent, naive, microsecond and `Z` times all read as UTC."""
    env.vars["TEST_ACE_KEY"] = fake.ace_key
    env.write_config(
        f"""
[sources.ace]
kind = "aceiot"
base_url = "{fake.base_url}"
api_key_env = "TEST_ACE_KEY"
site = "acme_hq"
window_seconds = 3600
page_size = 10
start = "2025-06-03T10:00:00Z"
lookback_seconds = 0
"""
    )
    pages = [fixture(f"aceiot/timeseries-paginated-page{n}.json") for n in (1, 2)]
    for raw in pages:
        fake.fail_next("body", body=raw)
    source = opened(env, "ace", now=datetime(2025, 6, 3, 11, 5, tzinfo=UTC))
    try:
        page = next(iter(source.pages(None, 1)))
    finally:
        source.close()
    first, second = fake.requests
    assert first.path == second.path == "/sites/acme_hq/timeseries/paginated"
    assert "cursor" not in first.query
    assert second.query["cursor"] == json.loads(pages[0])["next_cursor"]
    samples = [s for raw in pages for s in json.loads(raw)["point_samples"]]
    want = [
        ["acme_hq", s["name"], iso_utc(datetime.fromisoformat(s["time"]).replace(tzinfo=UTC)),
         s["value"]]
        for s in samples
    ]  # fmt: skip
    assert sorted(page.rows, key=str) == sorted(want, key=str)
    assert page.rejected == [] and len(page.rows) == 14
    temp = "acme/acme_hq/10.20.1.7/n4/AHU2/Supply_Air_Temp"
    by_key = {(r[1], r[2]): r[3] for r in page.rows}
    assert by_key[(temp, "2025-06-03T10:00:00Z")] == "55.400001525878906"
    assert by_key[(temp, "2025-06-03T10:15:00.627593Z")] == "54.29999923706055"
    assert by_key[(temp, "2025-06-03T10:25:00Z")] is None


def test_coingecko_missing_market_cap_and_null_price(env: Env, fake: FakeMarket) -> None:
    start = datetime(2024, 3, 1, 6, tzinfo=UTC)
    env.write_config(config(fake.base_url, start.isoformat()))
    t = [ms(start + i * HOUR) + 1234 for i in range(3)]
    body = {
        "prices": [[t[0], 123.25], [t[1], None], [t[2], None], [t[2] + 60_000, 7]],
        "market_caps": [[t[0], 827596236151.196], [t[1], None]],  # none at all for t[2]
        "total_volumes": [],
    }
    exact = json.dumps(body).replace("123.25", "42261.04061756690001")  # beyond a double
    fake.fail_next("body", body=exact)
    source = opened(env, "cg")
    try:
        rows = next(iter(source.pages(None, 1))).rows
    finally:
        source.close()
    assert [(r[7], r[10]) for r in rows] == [
        ("42261.04061756690001", "827596236151.196"),
        (None, None),  # the hour's only price is null: a dead letter naming close
        (7, None),  # a later point with a price wins over a null; no market cap: NULL
    ]


# -- 8. CryptoCompare's quotas -------------------------------------------------------------------

OVER = (
    '{{"Response":"Error","Message":"You are over your rate limit please upgrade your account!",'
    '"HasWarning":false,"Type":99,"RateLimit":{{"calls_made":{{"second":{s},"minute":{m},'
    '"hour":{h},"day":{d},"month":{mo},"total_calls":52622}},"max_calls":{{"second":20,'
    '"minute":300,"hour":3000,"day":7500,"month":50000}}}},"Data":{{}}}}'
)


def test_quota_windows_reset_on_calendar_boundaries() -> None:
    now = datetime(2024, 12, 31, 22, 59, 58, 500_000, tzinfo=UTC).timestamp()
    at = {w: iso_utc(datetime.fromtimestamp(quota_reset(w, now), UTC)) for w in
          ("second", "minute", "hour", "day", "month")}  # fmt: skip
    assert at == {
        "second": "2024-12-31T22:59:59Z",
        "minute": "2024-12-31T23:00:00Z",
        "hour": "2024-12-31T23:00:00Z",
        "day": "2025-01-01T00:00:00Z",
        "month": "2025-01-01T00:00:00Z",
    }

    def wait(**calls: int) -> tuple[float | None, str]:
        body = json.loads(OVER.format(**{"s": 1, "m": 3, "h": 4, "d": 7, "mo": 9, **calls}))
        r = rate_limit_retry(body, body["Message"], now=now)
        assert r.rate_limited
        return r.wait, r.message

    assert wait(s=20)[0] == pytest.approx(0.5)
    assert wait(m=300)[0] == pytest.approx(1.5)
    assert wait(m=300, h=3001)[0] == pytest.approx(1.5)  # the hour ends with the minute here
    w, message = wait(d=7773)
    assert w == pytest.approx(3601.5)
    assert "daily call limit reached (7773 calls made, 7500 allowed)" in message
    assert "resets at 2025-01-01T00:00:00Z" in message
    assert wait(d=7773, mo=50000)[1].startswith("cryptocompare monthly call limit")
    # No counts (an empty RateLimit): a second, as before.
    assert rate_limit_retry({"RateLimit": {}}, "over", now=now).wait == 1.0


def test_cryptocompare_used_up_daily_quota_bans_until_the_reset(env: Env, fake: FakeMarket) -> None:
    ctx = context(env, config(fake.base_url, recent().isoformat()))
    fake.fail_next("body", body=OVER.format(s=1, m=3, h=4, d=7773, mo=11627))
    summary = run_source(ctx, "cc")
    assert summary.status == "failed" and summary.pages == 0
    error = summary.error or ""
    tomorrow = iso_utc(floor_time(datetime.now(UTC), timedelta(days=1)) + timedelta(days=1))
    assert "daily call limit reached (7773 calls made, 7500 allowed)" in error
    assert f"resets at {tomorrow}" in error and "banned" in error
    assert len(fake.requests) == 1  # not retried every second
    # Every later run stops at once until the quota resets, without calling.
    again = run_source(ctx, "cc")
    assert again.status == "failed" and "banned" in (again.error or "")
    assert len(fake.requests) == 1


def test_cryptocompare_per_second_limit_is_waited_out(env: Env, fake: FakeMarket) -> None:
    ctx = context(env, config(fake.base_url, recent().isoformat()))
    fake.fail_next("body", body=OVER.format(s=20, m=3, h=4, d=7, mo=9))
    summary = run_source(ctx, "cc")
    assert summary.status == "ok" and summary.records == 12
    assert len(fake.requests) == 3  # the limited call once more, then the other pair

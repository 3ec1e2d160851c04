"""`sluice backfill` for every HTTP adapter: a multi-day past range through real workers into both
sinks, every point exactly once, interrupted and resumed without asking the API for a window
twice, and the live cursor never moved.

Each case names a source of CONFIG, how its API's requests identify a window, the requests the
range must produce (from each API's documented contract: Binance startTime/endTime,
CryptoCompare toTs and `limit + 1` candles, CoinGecko from/to, ACE start_time/end_time with cursor
pages) and the value the fake serves for a point, so the expected rows come from the fake's own
data: its periods in the range, less the point it leaves out (`missing`), with the point it sends
twice (`duplicate`) once, and for CryptoCompare none before the pair was listed (zero-filled
candles).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

from sluice.ops.backfill import progress_key, run_backfill
from sluice.ops.status import total_depth
from sluice.ops.workers import WorkerPool
from sluice.producers.cursors import CursorStore
from sluice.producers.http_source import floor_time, iso_utc
from sluice.producers.produce import LOCK_SECONDS
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn, postgres_engine
from sluice.shared.errors import ApiBannedError
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import StateStore
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket, Seen, price
from tests.ops.test_cli import sluice
from tests.producers.test_http_sources import PG_QUEUES
from tests.producers.test_http_sources import config as live_config

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
FIVE_MINUTES = timedelta(minutes=5)
# CoinGecko's Demo plan serves only the past 365 days: the range is relative to today.
FROM = floor_time(datetime.now(UTC), DAY) - timedelta(days=8)
TO = FROM + timedelta(days=3)
LIVE = FROM + timedelta(days=6)  # a live cursor after the range
LISTED = FROM + DAY + timedelta(hours=3)  # CryptoCompare pairs exist from here (zeros before)
ACE_POINTS = ["demo/site/ahu1/damper", "demo/site/ahu1/temp"]
ACE_PAGE = 100

CONFIG = """
[sources.bn]
kind = "binance"
base_url = "{base}"
api_key_env = "TEST_BN_KEY"
symbols = ["BTCUSDT", "ETHUSDT"]
interval = "1h"
limit = 24

[sources.bnx]
kind = "binance"
base_url = "{base}"
symbols = ["BTCUSDT", "NOSUCHCOIN", "ETHUSDT"]
interval = "1h"
limit = 24

[sources.cg]
kind = "coingecko"
base_url = "{base}"
api_key_env = "TEST_CG_KEY"
coins = ["bitcoin", "ethereum"]
vs_currency = "usd"
window_days = 1
rate_limit_fallback_seconds = 0.5

[sources.cg90]
kind = "coingecko"
base_url = "{base}"
api_key_env = "TEST_CG_KEY"
coins = ["bitcoin"]
window_days = 90

[sources.cch]
kind = "cryptocompare"
base_url = "{base}"
api_key_env = "TEST_CC_KEY"
pairs = ["BTC/USD", "ETH/USD"]
endpoint = "histohour"
limit = 23

[sources.ccm]
kind = "cryptocompare"
base_url = "{base}"
api_key_env = "TEST_CC_KEY"
pairs = ["BTC/USD"]
endpoint = "histominute"
limit = 2000

[sources.ace]
kind = "aceiot"
base_url = "{base}"
api_key_env = "TEST_ACE_KEY"
site = "demo_site"
window_seconds = 86400
page_size = {ace_page}
"""

KEYS = {"TEST_BN_KEY": "bn-key", "TEST_CG_KEY": "cg-key", "TEST_CC_KEY": "cc-key"}


def ms(t: datetime) -> str:
    return str(int(t.timestamp() * 1000))


def sec(t: datetime) -> str:
    return str(int(t.timestamp()))


def zulu(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def spans(width: timedelta) -> list[tuple[datetime, datetime]]:
    """[FROM, TO) cut into windows of `width`, the last one shorter."""
    out, t = [], FROM
    while t < TO:
        out.append((t, min(t + width, TO)))
        t += width
    return out


Query = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Case:
    source: str  # in CONFIG
    period: timedelta  # one point per series and period
    series: tuple[str, ...]  # partitions (for ACE: the points of the one site)
    partitions: tuple[str, ...]
    path: Callable[[str], str]  # request path of a partition
    # The requests for one partition's windows (ACE's without their page cursor).
    windows: Callable[[str, FakeMarket], list[dict[str, str]]]
    value: Callable[[str, int], str]  # what the fake serves for a series at epoch t, as stored
    key_header: tuple[str, str]  # the API key as the adapter must send it
    listed_from: int = 0  # CryptoCompare's pair listing (zeros before)
    width: timedelta = DAY  # of a window, as configured in CONFIG
    table: str = "historical_prices"

    def expected(self, fake: FakeMarket) -> dict[tuple[str, str], str]:
        """(series, time) -> value, from the fake's data in [FROM, TO)."""
        out, t = {}, FROM
        while t < TO:
            epoch = int(t.timestamp())
            if epoch not in fake.missing and epoch >= self.listed_from:
                for s in self.series:
                    out[(s, iso_utc(t))] = self.value(s, epoch)
            t += self.period
        return out

    def window_of(self, r: Seen) -> tuple[str, Query]:
        return r.path, frozenset((k, v) for k, v in r.query.items() if k != "cursor")


def _binance_windows(symbol: str, fake: FakeMarket) -> list[dict[str, str]]:
    out = []
    for a, b in spans(24 * HOUR):
        q = {
            "symbol": symbol,
            "interval": "1h",
            "startTime": ms(a),
            "endTime": str(int(ms(b)) - 1),  # the last millisecond of the window
            "limit": "24",
        }
        out.append(q)
        if any(a.timestamp() <= t < b.timestamp() for t in fake.duplicate):
            # The repeated bar took room in the 24-bar answer: the window's last bar is asked
            # for next (Binance's klines: startTime = the last bar's open time + interval).
            out.append(dict(q, startTime=ms(b - HOUR)))
    return out


def _cryptocompare_windows(
    step: timedelta, limit: int
) -> Callable[[str, FakeMarket], list[dict[str, str]]]:
    def windows(pair: str, _fake: FakeMarket) -> list[dict[str, str]]:
        fsym, tsym = pair.split("/")
        return [  # backwards from the window's newest candle: limit + 1 candles
            {"fsym": fsym, "tsym": tsym, "limit": str((b - a) // step - 1), "toTs": sec(b - step)}
            for a, b in spans(step * (limit + 1))
        ]

    return windows


def _coingecko_windows(coin: str, _fake: FakeMarket) -> list[dict[str, str]]:
    return [{"vs_currency": "usd", "from": sec(a), "to": sec(b)} for a, b in spans(DAY)]


def _ace_windows(site: str, _fake: FakeMarket) -> list[dict[str, str]]:
    return [
        {
            "start_time": zulu(a),
            "end_time": zulu(b),
            "page_size": str(ACE_PAGE),
            "raw_data": "false",
        }
        for a, b in spans(DAY)
    ]


def _close(t: int) -> str:
    return f"{price(t) + 0.5:.1f}"


def kline(t: datetime) -> list[object]:
    """A kline as the fake (and Binance) sends it for the bar opening at t."""
    p, at = price(int(t.timestamp())), int(ms(t))
    bar = [f"{p:.8f}", f"{p + 1:.8f}", f"{p - 1:.8f}", f"{p + 0.5:.8f}", "10.5"]
    return [at, *bar, at + 3_599_999, "1050.0", 7, "5.0", "500.0", "0"]


CASES = {
    "binance": Case(
        "bn",
        HOUR,
        ("BTCUSDT", "ETHUSDT"),
        ("BTCUSDT", "ETHUSDT"),
        lambda _p: "/api/v3/klines",
        _binance_windows,
        lambda _s, t: _close(t),
        ("X-MBX-APIKEY", "bn-key"),
    ),
    "coingecko": Case(
        "cg",
        HOUR,
        ("bitcoin/usd", "ethereum/usd"),
        ("bitcoin", "ethereum"),
        lambda coin: f"/coins/{coin}/market_chart/range",
        _coingecko_windows,
        lambda _s, t: f"{price(t):.1f}",  # the hour's first point
        ("x-cg-demo-api-key", "cg-key"),
    ),
    "cryptocompare-histohour": Case(
        "cch",
        HOUR,
        ("BTC/USD", "ETH/USD"),
        ("BTC/USD", "ETH/USD"),
        lambda _p: "/data/v2/histohour",
        _cryptocompare_windows(HOUR, 23),
        lambda _s, t: _close(t),
        ("authorization", "Apikey cc-key"),
        listed_from=int(LISTED.timestamp()),
    ),
    "cryptocompare-histominute": Case(
        "ccm",
        MINUTE,
        ("BTC/USD",),
        ("BTC/USD",),
        lambda _p: "/data/v2/histominute",
        _cryptocompare_windows(MINUTE, 2000),
        lambda _s, t: _close(t),
        ("authorization", "Apikey cc-key"),
        listed_from=int(LISTED.timestamp()),
        width=2001 * MINUTE,  # limit + 1 candles
    ),
    "aceiot": Case(
        "ace",
        FIVE_MINUTES,
        tuple(ACE_POINTS),
        ("demo_site",),
        lambda site: f"/sites/{site}/timeseries/paginated",
        _ace_windows,
        lambda s, t: f"{price(t) + ACE_POINTS.index(s) / 10:.1f}",
        ("Authorization", "Bearer ace-test-key"),
        table="timeseries",
    ),
}

# Each API's rate-limit answer as its documentation gives it, injected into a request
# mid-backfill, and the least the client must wait before asking again.
RATE_LIMITED: dict[str, tuple[dict[str, object], float]] = {
    "bn": (
        {
            "kind": "status",
            "status": 429,
            "headers": {"Retry-After": "1"},
            "body": '{"code":-1003,"msg":"Too much request weight used; current limit is 6000'
            ' request weight per 1 MINUTE."}',
        },
        1.0,
    ),
    "cg": (  # no Retry-After: the configured fallback
        {
            "kind": "status",
            "status": 429,
            "body": '{"status":{"error_code":429,"error_message":"You\'ve exceeded the Rate'
            ' Limit."}}',
        },
        0.5,
    ),
    "cch": (  # over the limit inside HTTP 200
        {
            "kind": "body",
            "body": '{"Response":"Error","Message":"You are over your rate limit please upgrade'
            ' your account!","HasWarning":false,"Type":99,"RateLimit":{},"Data":{}}',
        },
        1.0,
    ),
    "ace": ({"kind": "status", "status": 429, "headers": {"Retry-After": "1"}}, 1.0),
}
RATE_LIMITED["ccm"] = RATE_LIMITED["cch"]


@pytest.fixture
def fake() -> Iterator[FakeMarket]:
    with FakeMarket() as f:
        yield f


def use(env: Env, fake: FakeMarket) -> Context:
    env.vars.update(KEYS, TEST_ACE_KEY=fake.ace_key)
    env.write_config(CONFIG.format(base=fake.base_url, ace_page=ACE_PAGE))
    migrate_sqlite(env.sqlite_path)
    return app.configure(Settings.load(env.vars))


def wait_committed(ctx: Context, source: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ctx.progress.in_flight(source) == 0 and total_depth(ctx.redis) == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"backfill pages not committed within {timeout}s")


def stored(env: Env, case: Case) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Every (series, time, value) row of the case's table in PostgreSQL and in SQLite."""
    if case.table == "timeseries":
        cols, where = 'point_name, "timestamp", value', "TRUE"
    else:
        src = {"bn": "binance", "cg": "coingecko"}.get(case.source, "cryptocompare")
        res = "1m" if case.period == MINUTE else "1h"
        cols = 'symbol, "timestamp", close'
        where = f"source = '{src}' AND resolution = '{res}'"
    sql = f"SELECT {cols} FROM {case.table} WHERE {where}"

    def norm(series: object, t: object, v: object) -> tuple[str, str, str]:
        when = t if isinstance(t, datetime) else datetime.fromisoformat(str(t))
        return str(series), iso_utc(when), v if isinstance(v, str) else f"{v:.1f}"

    pg = psycopg2.connect(libpq_dsn(env.pg_url))
    try:
        with pg.cursor() as cur:
            cur.execute(sql)
            in_pg = [norm(*r) for r in cur.fetchall()]
    finally:
        pg.close()
    lite = sqlite3.connect(env.sqlite_path)
    try:
        in_lite = [norm(*r) for r in lite.execute(sql)]
    finally:
        lite.close()
    return in_pg, in_lite


@pytest.mark.parametrize("name", list(CASES))
def test_backfill_every_adapter_lands_every_point_once(
    env: Env, fake: FakeMarket, name: str
) -> None:
    case = CASES[name]
    src = case.source
    fake.cc_key = KEYS["TEST_CC_KEY"]  # CryptoCompare answers 401 without the key header
    fake.listed_from = case.listed_from
    p = case.period
    # Both on day 2 or 3, after CryptoCompare's listing.
    fake.missing.add(int((FROM + DAY + 4 * HOUR + 5 * p).timestamp()))  # absent: not stored
    fake.duplicate.add(int((FROM + 2 * DAY + 7 * p).timestamp()))  # sent twice: stored once
    ctx = use(env, fake)
    cursors = CursorStore(StateStore(postgres_engine(env.pg_url)))
    cursors.set(src, case.partitions[0], LIVE)  # a live cursor well after the range
    expected = case.expected(fake)
    plan = {
        part: [(case.path(part), frozenset(q.items())) for q in case.windows(part, fake)]
        for part in case.partitions
    }
    windows_total = len(spans(case.width)) * len(case.partitions)
    said: list[str] = []

    # Interrupted after two windows (no workers yet: the pages wait in the queues).
    first = run_backfill(ctx, src, FROM, TO, said.append, max_windows=2)
    assert first.status == "stopped"
    assert (first.windows_total, first.windows_done, first.windows_this_run) == (
        windows_total,
        2,
        2,
    )
    assert said[-1].startswith(f"{src}: window 2/{windows_total} (")
    first_windows = {case.window_of(r) for r in fake.requests}
    assert len(first_windows) == 2
    n_first = len(fake.requests)

    # Resumed with workers, a rate-limit answer injected into its first request.
    fault, least_wait = RATE_LIMITED[src]
    fake.fail_at(n_first, **fault)  # type: ignore[arg-type]
    pool = WorkerPool(env.vars, env.dir / "logs")
    try:
        pool.start("pg", PG_QUEUES, 1)
        pool.start_sqlite_writer()
        second = run_backfill(ctx, src, FROM, TO, said.append)
        assert second.status == "complete", second.error
        assert (second.windows_done, second.windows_this_run) == (
            windows_total,
            windows_total - 2,
        )
        assert f"{src}: resuming: 2/{windows_total} window(s) done" in said
        # A third run finds nothing left to fetch.
        n_second = len(fake.requests)
        third = run_backfill(ctx, src, FROM, TO, said.append)
        assert third.status == "complete" and third.windows_this_run == 0
        assert len(fake.requests) == n_second
        wait_committed(ctx, src)
    finally:
        pool.stop()
    requests = fake.requests
    resumed = requests[n_first:]

    # What the adapter sent: exactly the planned windows, each once per run (the rate-limited
    # request repeated after the server's wait), none of the first run's asked for again.
    assert {case.window_of(r) for r in requests} == {w for ws in plan.values() for w in ws}
    assert not first_windows & {case.window_of(r) for r in resumed}
    limited, retry = resumed[0], resumed[1]
    assert (retry.path, retry.query) == (limited.path, limited.query)
    assert retry.at - limited.at >= least_wait - 0.05
    header, key = case.key_header
    assert all(r.headers.get(header) == key for r in requests)
    assert all("api_key" not in r.query for r in requests)  # never a key in the URL
    if src == "ace":
        # Several pages per window, each asked once, following distinct cursors.
        per_window = Counter(case.window_of(r) for r in requests if r is not limited)
        pages = math.ceil(len(ACE_POINTS) * (DAY // FIVE_MINUTES + 1) / ACE_PAGE)  # end incl.
        assert sorted(per_window.values()) == [pages, pages, pages]
        for window in per_window:
            sent = [
                r.query["cursor"]
                for r in requests
                if r is not limited and "cursor" in r.query and case.window_of(r) == window
            ]
            assert len(sent) == len(set(sent)) == pages - 1
    else:
        # One call per planned request: CryptoCompare's backwards paging stops at its window's
        # start and at a page of zero candles (before the pair was listed) instead of going on.
        assert len(requests) == sum(len(w) for w in plan.values()) + 1

    # Every point once in both sinks: what the fake has in the range, less the missing one, the
    # duplicated one once, nothing outside the range; and each window's rows enqueued once.
    assert first.records + second.records == len(expected)
    in_pg, in_lite = stored(env, case)
    want = sorted((s, t, v) for (s, t), v in expected.items())
    for rows in (in_pg, in_lite):
        assert len(rows) == len(set(rows)) == len(expected)
        assert sorted(rows) == want
    # The live cursor did not move, none was created for the other partitions; the backfill's
    # own bookkeeping lives under another source name.
    assert cursors.get_all(src) == {case.partitions[0]: LIVE}
    book = cursors.get_all(f"backfill:{src}")
    assert book == {progress_key(part, FROM, TO): TO for part in case.partitions}


def test_coingecko_windows_keep_hourly_points(env: Env, fake: FakeMarket) -> None:
    """CoinGecko picks the granularity from the range: more than 90 days answers daily points,
    1 day ending now 5-minute ones. A backfill from an unaligned time with 90-day windows must
    still store one point per hour: no request may span more than 90 days once its start is
    floored to the hour, and the short window ending now is bucketed to hours."""
    ctx = use(env, fake)
    now_hour = floor_time(datetime.now(UTC), HOUR)
    start = now_hour - 90 * DAY - 12 * HOUR + 30 * MINUTE
    summary = run_backfill(ctx, "cg90", start, now_hour)
    assert (summary.status, summary.windows_total, summary.pages) == ("complete", 2, 2)
    ranges = [(int(r.query["from"]), int(r.query["to"])) for r in fake.requests]
    first_hour = floor_time(start, HOUR)
    assert ranges == [
        (int(first_hour.timestamp()), int((first_hour + 90 * DAY).timestamp())),
        (int((first_hour + 90 * DAY).timestamp()), int(now_hour.timestamp())),
    ]
    assert ranges[0][1] - ranges[0][0] == 90 * 86400  # hourly, not daily
    assert ranges[1][1] - ranges[1][0] <= 86400  # ends now: the fake serves 5-minute points
    # One row per hour from the hour --from is in to now.
    assert summary.records == (now_hour - first_hour) // HOUR


def test_ace_stuck_cursor_stops_the_backfill_and_a_rerun_resumes_at_the_cut(
    env: Env, fake: FakeMarket
) -> None:
    fake.ace_bug = "stuck"  # the server's offset bug: page 2 answers with the cursor it got
    ctx = use(env, fake)
    first = run_backfill(ctx, "ace", FROM, TO)
    assert (first.status, first.incomplete) == ("stopped", ["demo_site"])
    assert first.error is not None and "stopped paging part-way" in first.error
    assert len(fake.requests) == 2  # never loops on the repeated cursor
    # Complete up to the newest sample seen: the last of page 2 (samples 100..199).
    cut = FROM + (2 * ACE_PAGE // len(ACE_POINTS) - 1) * FIVE_MINUTES
    book = CursorStore(StateStore(postgres_engine(env.pg_url)))
    assert book.get_all("backfill:ace") == {progress_key("demo_site", FROM, TO): cut}
    assert first.records == len(ACE_POINTS) * ((cut - FROM) // FIVE_MINUTES)

    fake.ace_bug = None
    fake.requests.clear()
    second = run_backfill(ctx, "ace", FROM, TO)
    assert second.status == "complete" and second.incomplete == []
    assert fake.requests[0].query["start_time"] == zulu(cut)
    # Nothing twice, nothing lost across the cut.
    assert first.records + second.records == len(ACE_POINTS) * ((TO - FROM) // FIVE_MINUTES)
    assert book.get_all("ace") == {}  # no live cursor created


def test_binance_ban_stops_the_backfill_and_keeps_its_progress(env: Env, fake: FakeMarket) -> None:
    ctx = use(env, fake)
    fake.fail_at(
        1,
        "status",
        status=418,
        headers={"Retry-After": "600"},
        body='{"code":-1003,"msg":"Way too much request weight used; IP banned until 0."}',
    )
    with pytest.raises(ApiBannedError) as err:
        run_backfill(ctx, "bn", FROM, TO)
    assert "ETHUSDT" in str(err.value)  # the window it was fetching
    assert len(fake.requests) == 2  # not retried into the ban
    book = CursorStore(StateStore(postgres_engine(env.pg_url))).get_all("backfill:bn")
    assert book == {progress_key("BTCUSDT", FROM, TO): FROM + DAY}
    # While banned a rerun fails at once, without a request.
    with pytest.raises(ApiBannedError):
        run_backfill(ctx, "bn", FROM, TO)
    assert len(fake.requests) == 2


def test_binance_weight_header_near_the_limit_pauses_the_api(env: Env, fake: FakeMarket) -> None:
    """`x-mbx-used-weight-1m` counts the whole IP's weight (clients we do not see): near 6000 every
    producer pauses until the minute ends (the pause lives in Redis, shared by all processes)."""
    ctx = use(env, fake)
    pause_key = "sluice:ratelimit:binance:pause"
    run_backfill(ctx, "bn", FROM, TO, max_windows=1)
    assert fake.requests[-1].path == "/api/v3/klines"
    assert ctx.redis.pttl(pause_key) == -2  # weight 2: no pause
    if time.time() % 60 > 58:
        time.sleep(2.5)  # the pause lasts until the minute ends: not a few milliseconds
    fake.used_weight = 5500
    run_backfill(ctx, "bn", FROM, TO, max_windows=1)
    assert ctx.redis.pttl(pause_key) > 0


def test_permanent_errors_fail_their_partition_unretried(env: Env, fake: FakeMarket) -> None:
    ctx = use(env, fake)
    book = CursorStore(StateStore(postgres_engine(env.pg_url)))
    # CryptoCompare: an error inside HTTP 200 (not the rate-limit type) is permanent. It stops
    # ETH/USD (the second request), BTC/USD goes on to the end of the range.
    fake.fail_at(
        1,
        "body",
        body='{"Response":"Error","Message":"toTs param is not valid.","HasWarning":false,'
        '"Type":2,"RateLimit":{},"Data":{},"ParamWithError":"toTs"}',
    )
    summary = run_backfill(ctx, "cch", FROM, TO)
    assert summary.status == "partial"
    assert [f["partition"] for f in summary.failed] == ["ETH/USD"]
    assert "inside HTTP 200: toTs param is not valid" in summary.failed[0]["error"]
    assert summary.error is not None and "ETH/USD" in summary.error
    assert summary.windows_done == summary.windows_this_run == summary.windows_total - 3
    eth = [r for r in fake.requests if r.query.get("fsym") == "ETH"]
    assert len(eth) == 1  # not retried, not asked again for its later windows
    assert book.get_all("backfill:cch") == {progress_key("BTC/USD", FROM, TO): TO}
    # CoinGecko's Demo plan: history older than 365 days is a permanent 401/10012, for every
    # coin: the backfill failed, each coin asked once.
    fake.requests.clear()
    old = floor_time(datetime.now(UTC), DAY) - timedelta(days=400)
    summary = run_backfill(ctx, "cg", old, old + DAY)
    assert (summary.status, summary.windows_this_run, summary.pages) == ("failed", 0, 0)
    assert [f["partition"] for f in summary.failed] == ["bitcoin", "ethereum"]
    assert all("status=401" in f["error"] and "10012" in f["error"] for f in summary.failed)
    assert len(fake.requests) == 2
    assert book.get_all("backfill:cg") == {}


def test_a_bad_symbol_fails_alone_and_the_command_says_so(env: Env, fake: FakeMarket) -> None:
    """One partition's permanent error (an unknown symbol's 400) does not stop the others: they
    complete, the summary names it, the command exits non-zero, and a rerun fetches only what
    the failed partition still lacks."""
    use(env, fake)
    fake.unknown = {"NOSUCHCOIN"}
    args = ["backfill", "bnx", "--from", iso_utc(FROM), "--to", iso_utc(TO), "--json"]
    r = sluice(*args, env=env.vars, timeout=120)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "partial"
    assert [f["partition"] for f in doc["failed"]] == ["NOSUCHCOIN"]
    assert 'HTTP 400: {"code": -1121, "msg": "Invalid symbol."}' in doc["failed"][0]["error"]
    assert "NOSUCHCOIN" in doc["error"]
    assert (doc["windows_total"], doc["windows_done"]) == (9, 6)
    assert doc["records"] == 2 * 72  # BTCUSDT and ETHUSDT: every hour of the three days
    assert "bnx: NOSUCHCOIN failed (the other partitions go on)" in r.stderr
    asked = Counter(q.query["symbol"] for q in fake.requests)
    assert asked == {"BTCUSDT": 3, "ETHUSDT": 3, "NOSUCHCOIN": 1}  # the 400 was not retried
    book = CursorStore(StateStore(postgres_engine(env.pg_url)))
    assert book.get_all("backfill:bnx") == {
        progress_key("BTCUSDT", FROM, TO): TO,
        progress_key("ETHUSDT", FROM, TO): TO,
    }
    # The symbol is fixed (listed now): the rerun asks only for its windows, and completes.
    fake.unknown = set()
    fake.requests.clear()
    r = sluice(*args[:-1], env=env.vars, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "complete, 9/9 window(s) done (3 this run)" in r.stdout
    assert {q.query["symbol"] for q in fake.requests} == {"NOSUCHCOIN"}


def test_a_rejected_kline_becomes_a_dead_letter_and_the_rest_is_stored(
    env: Env, fake: FakeMarket
) -> None:
    """A window whose answer holds items that are not klines is published with them: they land
    in failed_ingestions, its klines in both sinks. A window of nothing else is still a page
    (its letters are stored before its acknowledgement), not a window done without them."""
    ctx = use(env, fake)
    end = FROM + DAY
    hours = [FROM + i * HOUR for i in range(24)]
    klines: list[object] = [kline(t) for t in hours]
    klines[5] = {"openTime": int(ms(hours[5]))}  # not an array: a dead letter
    fake.fail_at(0, "body", body=json.dumps(klines))  # BTCUSDT's window
    fake.fail_at(1, "body", body=json.dumps([{"what": "not a kline"}]))  # all of ETHUSDT's
    pool = WorkerPool(env.vars, env.dir / "logs")
    try:
        pool.start("pg", PG_QUEUES, 1)
        pool.start_sqlite_writer()
        summary = run_backfill(ctx, "bn", FROM, end)
        wait_committed(ctx, "bn")
    finally:
        pool.stop()
    assert summary.status == "complete", summary.error
    assert (summary.pages, summary.records, summary.rejected) == (2, 23, 2)
    assert summary.failed == []
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT stream, sink, source, payload, error_message FROM failed_ingestions"
            )
            letters = cur.fetchall()
    finally:
        conn.close()
    assert [row[:3] for row in letters] == [("historical_prices", "source", "bn")] * 2
    # Each letter holds the item as read, and names its kline and symbol.
    by_item = {json.dumps(row[3]["_item"], sort_keys=True): row[4] for row in letters}
    btc = by_item[json.dumps({"openTime": int(ms(hours[5]))})]
    eth = by_item[json.dumps({"what": "not a kline"})]
    assert "binance kline #5 of the answer" in btc and "of BTCUSDT" in btc
    assert "binance kline #0 of the answer" in eth and "of ETHUSDT" in eth
    assert all("kline is a JSON dict, not an array" in m for m in (btc, eth))
    # The rest of BTCUSDT's window, in both sinks; nothing of ETHUSDT's.
    want = sorted(("BTCUSDT", iso_utc(t), _close(int(t.timestamp()))) for t in hours)
    del want[5]
    for rows in stored(env, CASES["binance"]):
        assert sorted(rows) == want
    # Both windows are done: the backfill's progress moved over them (the rejects are kept).
    book = CursorStore(StateStore(postgres_engine(env.pg_url)))
    assert book.get_all("backfill:bn") == {
        progress_key("BTCUSDT", FROM, end): end,
        progress_key("ETHUSDT", FROM, end): end,
    }
    assert book.get_all("bn") == {}  # no live cursor created


def test_a_running_backfill_holds_a_short_lease(env: Env, fake: FakeMarket) -> None:
    """One backfill of a source at a time, on a lease of seconds that the running backfill
    renews: a killed one frees its source quickly (it used to hold it for five minutes)."""
    ctx = use(env, fake)
    pattern = "sluice:lock:*backfill:bn"
    seen: list[tuple[list[int], str]] = []

    def say(message: str) -> None:
        if not seen:  # mid-run: the lease is held, short, and a second backfill is refused
            other = run_backfill(ctx, "bn", FROM, TO)
            seen.append(([ctx.redis.pttl(k) for k in ctx.redis.keys(pattern)], other.status))

    summary = run_backfill(ctx, "bn", FROM, TO, say, max_windows=2)
    assert summary.status == "stopped"
    (ttls, other), *_ = seen
    assert len(ttls) == 1 and 0 < ttls[0] <= LOCK_SECONDS * 1000 <= 30_000
    assert other == "skipped"
    assert ctx.redis.keys(pattern) == []  # released at the end


def test_backfill_cli_json_and_progress(env: Env, fake: FakeMarket) -> None:
    env.write_config(live_config(fake.base_url, start=LIVE.isoformat()))
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
    assert len([q for q in fake.requests if q.path == "/api/v3/klines"]) == 2
    bad = sluice("backfill", "bn", "--from", "2024-01-02", "--to", "2024-01-01", env=env.vars)
    assert bad.returncode == 2 and "--to must be after --from" in bad.stderr

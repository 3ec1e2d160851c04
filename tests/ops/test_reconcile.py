"""`sluice reconcile` against what real workers wrote: a KV namespace migrated into PostgreSQL,
SQLite and the fake remote D1 reconciles clean; tampering with any sink is caught and named;
a D1 source's invalid rows are reported as dead letters, not as missing.

3,000 keys by default; `SLUICE_RECONCILE_KEYS=50000 pytest -s tests/ops/test_reconcile.py -k kv`
runs the full size (50,000 keys) and prints the figures (keys, records per stream, times,
the report)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.kv_source import KvSource
from sluice.producers.produce import run_source
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.cloudflare import D1Client
from sluice.shared.database import libpq_dsn
from sluice.shared.migrations import migrate_d1, migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.fakes.d1_server import FakeD1
from tests.fakes.kv_server import FakeKV
from tests.helpers import drain
from tests.ops.test_cli import sluice
from tests.producers.test_kv_source import NOW_MS, NS

KV_STREAMS = ("users", "watchlists", "executions", "active_positions", "cache")
DB_ID = "5b0e9b8c-3c2d-4f4e-8a1b-6c7d8e9f0a1b"
TOKEN_ENV = "TEST_RECONCILE_D1_TOKEN"

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[FakeD1, Path]]:
    path = tmp_path / "remote-d1.sqlite"
    with FakeD1() as fake:
        fake.add_database(DB_ID, path)
        with D1Client(
            account_id=fake.account_id,
            database_id=DB_ID,
            api_token=fake.token,
            base_url=fake.base_url,
        ) as client:
            migrate_d1(client)
        yield fake, path


def put_namespace(fake: FakeKV, keys: int) -> int:
    """The bot's namespace with `keys` keys (as in pipeline/test_kv_scale.py); returns the users."""
    users = (keys - 2) // 3  # chat_ids and the cache, then 3 keys per user
    ids = [str(100_000_000 + i) for i in range(users)]
    fake.put(NS, "chat_ids", ids)
    fake.put(NS, "fear_greed_cache", {"data": {"score": 50}, "timestamp": NOW_MS})
    for i, cid in enumerate(ids):
        fake.put(NS, f"watchlist:{cid}", ["SPY", "AAPL", "MSFT"][: 1 + i % 3])
        fake.put(
            NS,
            f"execution_history:{cid}",
            [
                {
                    "signalType": "BUY" if j % 2 == 0 else "SELL",
                    "ticker": "SPY",
                    "executionPrice": 400.0 + j + i / 100,
                    "executionDate": NOW_MS + j,
                    **({"signalPrice": 399.5} if j == 0 else {}),
                }
                for j in range(2)
            ],
        )
        fake.put(NS, f"active_position:{cid}", {"ticker": "SPY", "entryPrice": 401.0 + i})
    return users


def three_sink_config(kv: FakeKV, d1: FakeD1) -> str:
    streams = "".join(
        f'[streams.{s}]\nsinks = ["postgres", "sqlite", "d1"]\n\n' for s in KV_STREAMS
    )
    return f"""
[pipeline]
page_size = 1000
fk_retries = 6
fk_retry_seconds = 0.5

[sources.bot]
kind = "kv"
mode = "remote"
account_id = "{kv.account_id}"
namespace_id = "{NS}"
base_url = "{kv.base_url}"

{streams}
[sinks.d1]
account_id = "{d1.account_id}"
database_id = "{DB_ID}"
base_url = "{d1.base_url}"
api_token_env = "{TOKEN_ENV}"
"""


def snapshot_counts(settings: Settings) -> dict[str, int]:
    """Distinct keys per stream, straight from the source's snapshot."""
    source = open_source(settings, "bot")
    assert isinstance(source, KvSource)
    keys: dict[str, set[tuple[Any, ...]]] = {s: set() for s in KV_STREAMS}
    try:
        for name, row in source.snapshot():
            stream = settings.stream(name)
            keys[name].add(tuple(row[i] for i in stream.key_indexes))
    finally:
        source.close()
    return {s: len(k) for s, k in keys.items()}


def reconcile_json(env: Env, *args: str) -> tuple[int, dict[str, Any]]:
    done = sluice("reconcile", *args, "--json", env=env.vars, timeout=900)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def pg_exec(url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    conn = psycopg2.connect(libpq_dsn(url))
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def lite_exec(path: Path, sql: str, params: tuple[Any, ...] = (), fk: bool = True) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA foreign_keys={'ON' if fk else 'OFF'}")
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def test_kv_namespace_into_three_sinks_reconciles_clean_then_tampering_is_named(
    env: Env, remote: tuple[FakeD1, Path]
) -> None:
    d1, d1_path = remote
    n_keys = int(os.environ.get("SLUICE_RECONCILE_KEYS", "3000"))
    kv = FakeKV()
    with kv:
        users = put_namespace(kv, n_keys)
        env.vars["CLOUDFLARE_API_TOKEN"] = kv.token
        env.vars[TOKEN_ENV] = d1.token
        env.write_config(three_sink_config(kv, d1))
        settings = Settings.load(env.vars)
        ctx = app.configure(settings)
        migrate_sqlite(env.sqlite_path)
        expected = snapshot_counts(settings)
        assert expected["users"] == users and expected["cache"] == 1

        pool = WorkerPool(env.vars, env.dir / "logs")
        try:
            pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 1)
            pool.start_sqlite_writer()
            pool.start("d1", ["ingest.d1"], 1)
            time.sleep(2)  # workers up before the clock starts
            t0 = time.perf_counter()
            first = run_source(ctx, "bot")
            assert first.status == "ok", first.error
            drain(ctx, "bot", timeout=1500)
            migrated_in = time.perf_counter() - t0
        finally:
            pool.stop()

        t1 = time.perf_counter()
        code, doc = reconcile_json(env, "bot", "--sample", "200", "--seed", "7")
        reconciled_in = time.perf_counter() - t1
        assert code == 0 and doc["ok"], json.dumps(doc)[:3000]
        for stream in KV_STREAMS:
            s = doc["streams"][stream]
            assert s["source"]["keys"] == expected[stream], stream
            assert s["source"]["invalid"] == 0 and s["dead_letters"] == {}
            assert s["extra_checked"] is True
            assert set(s["sinks"]) == {"postgres", "sqlite", "d1"}
            for sink, d in s["sinks"].items():
                assert d["count"] == d["rows"] == expected[stream], (stream, sink)
                assert d["missing"]["total"] == d["extra"]["total"] == 0
                assert d["sample"]["checked"] == min(200, expected[stream]), (stream, sink)
                assert d["sample"]["differ"] == 0
                assert d["orphans"]["total"] == 0
        # The same seed samples the same keys: a repeat is the same report.
        again_code, again = reconcile_json(env, "bot", "--sample", "200", "--seed", "7")
        assert again_code == 0
        assert {k: v for k, v in again.items() if k != "seconds"} == {
            k: v for k, v in doc.items() if k != "seconds"
        }

        table = sluice("reconcile", "bot", "--sample", "200", "--seed", "7", env=env.vars)
        assert table.returncode == 0, table.stderr
        assert "reconcile bot (kv): OK" in table.stdout
        print(
            f"\nreconcile scale: {n_keys} keys, records per stream"
            f" {json.dumps({s: expected[s] for s in KV_STREAMS})};"
            f" migrated into 3 sinks in {migrated_in:.1f}s; reconcile --json in"
            f" {reconciled_in:.1f}s (source read {doc['seconds']['source']}s)\n{table.stdout}"
        )

        # -- tampering: each sink, each kind of problem, named --------------------------------
        victim = str(100_000_000 + 1)  # user 1: 2 tickers, 2 executions, 1 position
        pg_exec(
            env.pg_url, "DELETE FROM watchlists WHERE chat_id = %s AND ticker = 'AAPL'", (victim,)
        )
        pg_exec(
            env.pg_url,
            "INSERT INTO users (chat_id, subscription_status, created_at, updated_at)"
            " VALUES ('not-in-kv', 1, 1, 1)",
        )
        lite_exec(
            env.sqlite_path,
            "UPDATE executions SET execution_price = 1.5"
            " WHERE chat_id = ? AND signal_type = 'SELL'",
            (victim,),
        )
        orphaned = str(100_000_000 + 2)
        lite_exec(env.sqlite_path, "DELETE FROM users WHERE chat_id = ?", (orphaned,), fk=False)
        lite_exec(
            d1_path,
            'UPDATE cache SET cache_value = \'{"data":{"score":51}}\' WHERE 1',
        )
        code, doc = reconcile_json(env, "bot", "--sample", "1000000")
        table = sluice("reconcile", "bot", "--sample", "1000000", env=env.vars)
    assert code == 1 and doc["ok"] is False
    watch_pg = doc["streams"]["watchlists"]["sinks"]["postgres"]
    assert watch_pg["missing"] == {"total": 1, "keys": [[victim, "AAPL"]]}
    assert not watch_pg["ok"] and doc["streams"]["watchlists"]["sinks"]["d1"]["ok"]
    users_pg = doc["streams"]["users"]["sinks"]["postgres"]
    assert users_pg["extra"] == {"total": 1, "keys": [["not-in-kv"]]}
    ex_lite = doc["streams"]["executions"]["sinks"]["sqlite"]
    assert ex_lite["sample"]["differ"] == 1
    assert ex_lite["sample"]["differences"] == [
        {
            "key": [victim, NOW_MS + 1, "SPY", "SELL"],
            "column": "execution_price",
            "source": 401.0 + 1 / 100,
            "sink": 1.5,
        }
    ]
    assert doc["streams"]["users"]["sinks"]["sqlite"]["missing"]["keys"] == [[orphaned]]
    for child in ("watchlists", "executions", "active_positions"):
        orphans = doc["streams"][child]["sinks"]["sqlite"]["orphans"]
        assert orphans["total"] >= 1 and all(k[0] == orphaned for k in orphans["keys"]), child
        assert orphans["parent"] == "chat_id → users.chat_id"
        assert doc["streams"][child]["sinks"]["postgres"]["orphans"]["total"] == 0
    cache_d1 = doc["streams"]["cache"]["sinks"]["d1"]["sample"]["differences"]
    assert [(d["column"], d["sink"]) for d in cache_d1] == [
        ("cache_value", {"data": {"score": 51}})
    ]
    # Nothing else is reported: each problem is where it was made.
    bad = {
        (stream, sink)
        for stream, s in doc["streams"].items()
        for sink, d in s["sinks"].items()
        if not d["ok"]
    }
    assert bad == {
        ("watchlists", "postgres"),
        ("users", "postgres"),
        ("executions", "sqlite"),
        ("users", "sqlite"),
        ("watchlists", "sqlite"),
        ("active_positions", "sqlite"),
        ("cache", "d1"),
    }
    assert table.returncode == 1, table.stderr
    print(table.stdout)
    assert "reconcile bot (kv): MISMATCH" in table.stdout
    assert f"missing watchlists in postgres (1): {victim}|AAPL" in table.stdout
    assert "orphans executions in sqlite (" in table.stdout


def test_d1_source_reconciles_clean_with_invalid_rows_as_dead_letters(env: Env) -> None:
    source_db = env.dir / "source-d1.sqlite"
    sample = write_d1_file(source_db, 3_000)
    assert sample.invalid > 0
    env.write_config(
        f'[pipeline]\npage_size = 500\n\n[sources.d1_usage]\nkind = "d1"\nstream = "usage_events"\n'
        f'path = "{source_db}"\nbatch_size = 500\nmax_batches = 20\n'
    )
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 1)
        pool.start_sqlite_writer()
        drain(ctx, "d1_usage", timeout=300)
        time.sleep(1)  # the dead-letter task commits after the pages' acknowledgements
    code, doc = reconcile_json(env, "d1_usage", "--sample", "500")
    assert code == 0 and doc["ok"], json.dumps(doc)[:3000]
    s = doc["streams"]["usage_events"]
    assert s["source"]["records"] == 3_000
    assert s["source"]["keys"] == len(sample.distinct_valid_keys)
    assert s["source"]["invalid"] == sample.invalid
    # Each sink dead-lettered every invalid row; none of them is reported missing.
    assert s["dead_letters"] == {"postgres": sample.invalid, "sqlite": sample.invalid}
    assert s["skipped_columns"] == "none"
    for sink in ("postgres", "sqlite"):
        d = s["sinks"][sink]
        assert d["count"] == d["rows"] == len(sample.distinct_valid_keys)
        assert d["missing"]["total"] == d["dead_lettered"]["total"] == d["extra"]["total"] == 0
        assert d["sample"]["checked"] == 500 and d["sample"]["differ"] == 0
        assert d["orphans"] == {"total": 0, "keys": [], "parent": None}

    # A row changed in PostgreSQL (jsonb) and one deleted in SQLite are caught.
    key = sorted(sample.distinct_valid_keys)[0]
    pg_exec(
        env.pg_url,
        'UPDATE usage_events SET metadata = \'{"region": "tampered"}\' WHERE idempotency_key = %s',
        (key,),
    )
    lite_exec(env.sqlite_path, "DELETE FROM usage_events WHERE idempotency_key = ?", (key,))
    code, doc = reconcile_json(env, "d1_usage", "--sample", "100000")
    assert code == 1
    d = doc["streams"]["usage_events"]["sinks"]
    assert [(x["key"], x["column"]) for x in d["postgres"]["sample"]["differences"]] == [
        ([key], "metadata")
    ]
    assert d["sqlite"]["missing"] == {"total": 1, "keys": [[key]]}


def test_usage_errors_exit_2(env: Env) -> None:
    env.write_config(
        '[sources.prices]\nkind = "binance"\nsymbols = ["BTCUSDT"]\nbase_url = "http://127.0.0.1:9"\n'
    )
    no_snapshot = sluice("reconcile", "prices", env=env.vars)
    assert no_snapshot.returncode == 2
    assert "has no snapshot" in no_snapshot.stderr
    unknown = sluice("reconcile", "nope", env=env.vars)
    assert unknown.returncode == 2 and "unknown source 'nope'" in unknown.stderr
    bad = sluice("reconcile", "prices", "--sample", "-1", env=env.vars)
    assert bad.returncode == 2


def test_d1_snapshot_reads_every_row_in_keyset_pages_and_changes_nothing(env: Env) -> None:
    from sluice.producers.d1_source import D1Source
    from tests.helpers import d1_processed

    source_db = env.dir / "source-d1.sqlite"
    write_d1_file(source_db, 250)
    lite_exec(source_db, "UPDATE usage_events SET processed_at = 'x' WHERE rowid % 2 = 0")
    before = dump(source_db)
    env.write_config(
        f'[sources.d1_usage]\nkind = "d1"\nstream = "usage_events"\npath = "{source_db}"\n'
        "batch_size = 7\n"
    )
    source = open_source(Settings.load(env.vars), "d1_usage")
    assert isinstance(source, D1Source)
    try:
        rows = list(source.snapshot())
        # A table's rows are read as they are: every stream column is compared.
        assert source.unknown_columns(source.stream, rows[0][1]) == set()
        assert source.skipped_columns("usage_events") is None
        assert source.capture == "mark" and not source.keeps_deleted
    finally:
        source.close()
    conn = sqlite3.connect(source_db)
    try:
        ids = [r[0] for r in conn.execute("SELECT id FROM usage_events ORDER BY rowid")]
    finally:
        conn.close()
    # Processed rows too, each once, in arrival order, in the stream's column order (id first).
    assert [row[0] for _, row in rows] == ids and len(ids) == 250
    assert {name for name, _ in rows} == {"usage_events"}
    assert d1_processed(source_db) == (250, 125)
    # The content (the file's header changes: the local D1 connection turns WAL on).
    assert dump(source_db) == before


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def test_cache_times_from_the_clock_are_skipped_and_data_times_compared(env: Env) -> None:
    export = env.dir / "kv.json"
    export.write_text(
        json.dumps(
            [
                {"key": "fear_greed_cache", "value": json.dumps({"score": 1})},  # no timestamp
                {"key": "other_cache", "value": json.dumps({"timestamp": NOW_MS})},
            ]
        )
    )
    env.write_config(
        f'[sources.bot]\nkind = "kv"\nmode = "local"\npath = "{export}"\n'
        '[[sources.bot.keys]]\npattern = "fear_greed_cache"\nstream = "cache"\n'
        '[[sources.bot.keys]]\npattern = "other_cache"\nstream = "cache"\n'
    )
    settings = Settings.load(env.vars)
    source = open_source(settings, "bot")
    assert isinstance(source, KvSource)
    now = NOW_MS + 5_000_000
    rows = {row[0]: row for _, row in source.snapshot(now_ms=now)}
    cache = settings.stream("cache")
    # The KV source knows which of its snapshot's values came from the snapshot's own clock.
    assert source.unknown_columns(cache, rows["fear_greed_cache"]) == {"updated_at", "expires_at"}
    assert source.unknown_columns(cache, rows["other_cache"]) == set()
    assert source.unknown_columns(settings.stream("users"), ["1", 1, now, now]) == {
        "created_at",
        "updated_at",
    }
    assert source.skipped_columns("users") and source.skipped_columns("executions") is None
    assert not source.keeps_deleted and source.capture is None

"""A KV namespace migrated end to end: the fake Workers KV API → real worker processes →
PostgreSQL and SQLite. Completeness (every record lands or is a dead letter), per-user count
validation, orphans dead-lettered naming the parent, the migration's status, and twice = once."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2
import pytest

from sluice.ops.status import collect_sources, render_status
from sluice.ops.status_report import StatusReport
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn, postgres_engine
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import StateStore
from tests.conftest import OWNER_KEY, Env
from tests.fakes.kv_server import FakeKV
from tests.helpers import drain
from tests.producers.test_kv_source import NS, bot_data

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]
KV_STREAMS = ("users", "watchlists", "executions", "active_positions", "cache")
KEY_SQL = {
    "users": "chat_id",
    "watchlists": "chat_id, ticker",
    "executions": "chat_id, execution_date, ticker, signal_type",
    "active_positions": "chat_id, ticker",
    "cache": "cache_key",
}


def kv_config(fake: FakeKV, page_size: int = 50) -> str:
    return f"""
[pipeline]
page_size = {page_size}
fk_retries = 2
fk_retry_seconds = 0.3

[sources.bot]
kind = "kv"
mode = "remote"
account_id = "{fake.account_id}"
namespace_id = "{NS}"
base_url = "{fake.base_url}"
"""


@pytest.fixture
def fake() -> Iterator[FakeKV]:
    with FakeKV() as f:
        yield f


def start_workers(env: Env) -> WorkerPool:
    pool = WorkerPool(env.vars, env.dir / "logs")
    pool.start("pg", PG_QUEUES, 2)
    pool.start_sqlite_writer()
    return pool


def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(libpq_dsn(url))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def lite_rows(env: Env, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(env.sqlite_path)
    try:
        return list(conn.execute(sql).fetchall())
    finally:
        conn.close()


def table_keys(env: Env, stream: str) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    sql = f"SELECT {KEY_SQL[stream]} FROM {stream}"
    return set(pg_rows(env.pg_url, sql)), set(lite_rows(env, sql))


def snapshot_keys(ctx: Context) -> dict[str, set[tuple[Any, ...]]]:
    source = open_source(ctx.settings, "bot")
    out: dict[str, set[tuple[Any, ...]]] = {s: set() for s in KV_STREAMS}
    try:
        for name, row in source.snapshot():  # type: ignore[attr-defined]
            stream = ctx.settings.stream(name)
            out[name].add(tuple(row[i] for i in stream.key_indexes))
    finally:
        source.close()
    return out


def test_kv_migration_end_to_end_complete_validated_and_once(env: Env, fake: FakeKV) -> None:
    data = bot_data(40)
    data["watchlist:999999"] = ["SPY", "QQQ"]  # no such user: dead letters naming the parent
    data["watchlist:1001"] = ["SPY", "'; DROP TABLE users; --", 'ΔΣ"x;']
    data["watchlist:1002"] = ["BAD\x00NUL", "OK"]
    data["execution_history:1003"] = "{not json"
    for key, value in data.items():
        fake.put(NS, key, value if key != "execution_history:1003" else value.encode())
    fake.fail_next("rate_limit", route="bulk_get", retry_after=0)
    env.vars["CLOUDFLARE_API_TOKEN"] = fake.token
    env.write_config(kv_config(fake))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    expected = snapshot_keys(ctx)
    fake.requests.clear()

    first = run_source(ctx, "bot")
    assert first.status == "ok", first.error
    assert first.pages >= 5 and first.records == sum(len(v) for v in expected.values())
    with start_workers(env):
        drain(ctx, "bot", timeout=180)
        # Twice = once: the migration is complete, a second run reads nothing.
        ingested = pg_rows(env.pg_url, "SELECT count(*) FROM ingestion_runs")
        requests_before = len(fake.requests)
        again = run_source(ctx, "bot")
        assert again.status == "ok" and again.pages == 0 and again.records == 0
        assert len(fake.requests) == requests_before
        assert pg_rows(env.pg_url, "SELECT count(*) FROM ingestion_runs") == ingested

    letters = pg_rows(
        env.pg_url,
        "SELECT stream, sink, record_key, error_class, error_message FROM failed_ingestions",
    )
    by_key = {(s, k) for s, _, k, _, _ in letters}
    orphan = {("999999", "SPY"), ("999999", "QQQ")}
    nul = {("1002", "BAD\x00NUL")}
    for stream in KV_STREAMS:
        in_pg, in_lite = table_keys(env, stream)
        assert in_pg == in_lite, stream
        # Completeness: each record landed, or is a dead letter (in each sink).
        missing = expected[stream] - in_pg
        for key in missing:
            assert (stream, "|".join(str(k) for k in key)) in by_key or key in nul, (stream, key)
        assert not in_pg - expected[stream], stream
    assert table_keys(env, "watchlists")[0] >= {("1001", "'; DROP TABLE users; --")}
    assert expected["watchlists"] - table_keys(env, "watchlists")[0] == orphan | nul

    fk = [x for x in letters if x[3] == "ForeignKeyViolation"]
    assert {(x[1], x[2]) for x in fk} == {
        (sink, f"999999|{t}") for sink in ("postgres", "sqlite") for t in ("SPY", "QQQ")
    }
    assert all("parent users.chat_id=999999 missing" in x[4] for x in fk)
    bad_json = [x for x in letters if x[3] == "KvMappingError"]
    assert [(x[0], x[1], x[2]) for x in bad_json] == [
        ("executions", "source", "execution_history:1003")
    ]
    assert "not JSON" in bad_json[0][4]
    assert any(x[3] == "ValidationError" and "NUL" in x[4] for x in letters)

    # Count validation: per user, the KV count equals the table count.
    for stream in ("watchlists", "executions", "active_positions"):
        kv_counts = Counter(k[0] for k in expected[stream] if k not in orphan | nul)
        for rows in (
            pg_rows(env.pg_url, f"SELECT chat_id, count(*) FROM {stream} GROUP BY chat_id"),
            lite_rows(env, f"SELECT chat_id, count(*) FROM {stream} GROUP BY chat_id"),
        ):
            assert dict(rows) == dict(kv_counts), stream

    # The migration knows it is done; status shows it.
    engine = postgres_engine(env.pg_url)
    try:
        errors: dict[str, str] = {}
        status = collect_sources(ctx, engine, StateStore(engine), errors)
    finally:
        engine.dispose()
    assert not errors
    migration = status["bot"].as_dict()["migration"]
    assert migration["status"] == "complete"
    assert migration["keys_seen"] == len(data)
    assert migration["dead_letters"] == 1
    assert migration["pages_acked"] == migration["pages_total"] == first.pages
    assert migration["records"] == first.records
    report = StatusReport(time=datetime.now(UTC), broker="redis", state="postgres", sources=status)
    text = render_status(report)
    assert "migration complete" in text and f"{len(data)} keys" in text


def test_migration_rerun_after_lost_pages_and_not_while_in_flight(env: Env, fake: FakeKV) -> None:
    for key, value in bot_data(5).items():
        fake.put(NS, key, value)
    env.vars["CLOUDFLARE_API_TOKEN"] = fake.token
    env.write_config(kv_config(fake))
    ctx = app.configure(Settings.load(env.vars))
    first = run_source(ctx, "bot")
    assert first.pages > 0
    # Pages in flight (no workers yet): a second run enqueues nothing and reads nothing.
    n = len(fake.requests)
    assert run_source(ctx, "bot").pages == 0
    assert len(fake.requests) == n
    # The pages are lost (broker flushed, lease gone): the next run migrates again.
    owner = ctx.redis.get(OWNER_KEY)  # keep this session's claim on the Redis database
    ctx.redis.flushdb()
    ctx.redis.set(OWNER_KEY, owner or b"?", ex=6 * 3600)
    second = run_source(ctx, "bot")
    assert second.pages == first.pages and second.records == first.records
    migrate_sqlite(env.sqlite_path)
    with start_workers(env):
        drain(ctx, "bot", timeout=120)
    assert pg_rows(env.pg_url, "SELECT status FROM source_migrations") == [("complete",)]
    assert pg_rows(env.pg_url, "SELECT count(*) FROM users") == [(5,)]
    assert lite_rows(env, "SELECT count(*) FROM users") == [(5,)]


def test_a_child_page_before_its_parent_waits_and_lands(env: Env, fake: FakeKV) -> None:
    """The race the FK retry exists for: the child page reaches the sinks first."""
    import time
    import uuid

    from sluice.shared.celery_app import ingest_queue
    from sluice.shared.page import Page
    from tests.helpers import wait_queues_empty

    env.write_config(kv_config(fake).replace("fk_retry_seconds = 0.3", "fk_retry_seconds = 1.0"))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)

    def publish(stream: str, rows: list[list[Any]]) -> None:
        columns = list(ctx.settings.stream(stream).column_names)
        page = Page(uuid.uuid4().hex, stream, "", "bot", "race", columns, rows)
        for sink in ("postgres", "sqlite"):
            app.send_task(
                "sluice.ingest", args=[page.for_sink(sink).encode()], queue=ingest_queue(sink)
            )

    with start_workers(env):
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5) or []) < 2:  # both workers consuming
            assert time.monotonic() < deadline, "workers did not start"
        publish("watchlists", [["42", "SPY", 1], ["42", "QQQ", 1]])
        time.sleep(0.5)  # the child page fails its first write: no user 42 yet
        publish("users", [["42", 1, 1, 1]])
        time.sleep(1.5)
        wait_queues_empty(ctx, timeout=60)
    for rows in (
        pg_rows(env.pg_url, "SELECT chat_id, ticker FROM watchlists ORDER BY ticker"),
        lite_rows(env, "SELECT chat_id, ticker FROM watchlists ORDER BY ticker"),
    ):
        assert rows == [("42", "QQQ"), ("42", "SPY")]
    assert pg_rows(env.pg_url, "SELECT count(*) FROM failed_ingestions") == [(0,)]
    waited = pg_rows(env.pg_url, "SELECT attempts FROM ingestion_runs WHERE stream = 'watchlists'")
    assert waited and waited[0][0] > 1


def test_cli_produce_twice_is_once_and_status_shows_the_migration(env: Env) -> None:
    """As an operator runs it: `sluice produce` (a local JSON export), twice; `sluice status`."""
    import json
    import time

    from tests.ops.test_cli import sluice

    export = env.dir / "kv.json"
    data = bot_data(7)
    export.write_text(json.dumps([{"key": k, "value": json.dumps(v)} for k, v in data.items()]))
    env.write_config(f'[sources.bot]\nkind = "kv"\nmode = "local"\npath = "{export}"\n')
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    with start_workers(env):
        first = sluice("produce", "bot", "--json", env=env.vars)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["records"] == 7 + 10 + 7 + 3 + 1
        deadline = time.monotonic() + 60
        while ctx.progress.in_flight("bot"):
            assert time.monotonic() < deadline, "pages not committed"
            time.sleep(0.2)
        second = sluice("produce", "bot", "--json", env=env.vars)
        assert json.loads(second.stdout)["pages"] == 0
        status = sluice("status", env=env.vars)
    assert status.returncode == 0, status.stderr
    assert f"migration complete: {len(data)} keys, 28 records, 0 dead letters" in status.stdout
    assert pg_rows(env.pg_url, "SELECT count(*) FROM watchlists") == [(10,)]
    assert lite_rows(env, "SELECT count(*) FROM executions") == [(7,)]

"""`sluice prune`: what retention deletes, and that it never deletes a record a sink lacks.

Real worker processes ingest a D1 file into real PostgreSQL and SQLite sinks; the prune then
runs as the operator runs it (`sluice prune`, a subprocess) or as beat schedules it (the
`sluice.prune` task, in a worker).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy import text

from sluice.ops.metrics import postgres_totals, sqlite_totals
from sluice.ops.prune import last_prunes, run_prune
from sluice.ops.prune_bench import load_sinks
from sluice.ops.prune_d1 import open_table
from sluice.ops.sample import Sample, write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.producers.schedule import beat_schedule
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn, postgres_engine
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import D1SourceConfig, Settings
from sluice.shared.state import open_state
from tests.conftest import Env
from tests.fakes.d1_server import FakeD1
from tests.helpers import d1_config, drain, pg_keys, sqlite_keys

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress", "produce"]
OLD = "2020-01-01T00:00:00.000Z"


def retention(**values: Any) -> str:
    body = "\n[retention]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    return body


def ingest(env: Env, workers: WorkerPool, n: int, **keep: Any) -> tuple[Context, Sample, Path]:
    """A D1 file of n rows, ingested into both sinks by real workers; every row processed."""
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, n)
    env.write_config(d1_config(d1, page_size=500, max_batches=100) + retention(**keep))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    workers.start("pg", PG_QUEUES, 2)
    workers.start_sqlite_writer()
    drain(ctx, "d1_usage")
    return ctx, sample, d1


def d1_rows(path: Path) -> dict[str, tuple[str, str | None]]:
    """id -> (idempotency_key, processed_at) of every row of the D1 file."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, idempotency_key, processed_at FROM usage_events")
        return {r[0]: (r[1], r[2]) for r in rows}
    finally:
        conn.close()


def age(path: Path, when: str = OLD, where: str = "processed_at IS NOT NULL") -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(
            f"UPDATE usage_events SET processed_at = ? WHERE {where}", (when,)
        ).rowcount
    finally:
        conn.close()


def sluice(
    env: Env, *args: str, vars_: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.ops.cli", *args],
        env=vars_ or env.vars,
        capture_output=True,
        text=True,
        timeout=300,
    )


def prune_json(
    env: Env, *args: str, vars_: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    r = sluice(env, "prune", "--json", *args, vars_=vars_)
    assert r.stdout, r.stderr
    doc = json.loads(r.stdout)
    return r.returncode, {t["target"]: t for t in doc["targets"]}


def assert_deleted_only_what_sinks_hold(
    env: Env, before: dict[str, Any], after: dict[str, Any]
) -> int:
    """Every row the prune removed from D1 has its key in both sinks; returns how many went."""
    gone = {i: before[i][0] for i in before if i not in after}
    held = set(pg_keys(env.pg_url)) & set(sqlite_keys(env.sqlite_path))
    lost = {i: k for i, k in gone.items() if k not in held}
    assert lost == {}, f"{len(lost)} rows deleted whose key a sink lacks"
    return len(gone)


# -- D1 rows -------------------------------------------------------------------------------------


def test_prune_deletes_old_processed_rows_every_sink_holds(env: Env, workers: WorkerPool) -> None:
    ctx, sample, d1 = ingest(env, workers, 3_000, d1_days=7, batch_size=400)
    # A sink restored from an older backup lacks some keys: their rows must stay in D1.
    lacking = sorted(sample.distinct_valid_keys)[:25]
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM usage_events WHERE idempotency_key = ANY(%s)", (lacking,))
    conn.close()
    assert age(d1) == 3_000
    # Recent rows stay whatever the sinks hold.
    recent = age(d1, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "rowid > 2900")
    before = d1_rows(d1)

    code, dry = prune_json(env, "--dry-run")
    assert code == 0
    assert d1_rows(d1) == before  # a dry run deletes nothing
    code, real = prune_json(env)
    assert code == 0, real
    after = d1_rows(d1)

    gone = assert_deleted_only_what_sinks_hold(env, before, after)
    assert real["d1:d1_usage"]["deleted"] == gone == dry["d1:d1_usage"]["deleted"]
    assert real["d1:d1_usage"]["kept"] == dry["d1:d1_usage"]["kept"]
    # What stays: the recent rows, and the old ones whose key a sink lacks (restored from a
    # backup, or a record that was dead-lettered): exactly those.
    held = set(pg_keys(env.pg_url)) & set(sqlite_keys(env.sqlite_path))
    old = [i for i, (_, processed) in before.items() if processed == OLD]
    assert len(old) == 3_000 - recent
    expected = {i for i in old if before[i][0] not in held}
    assert {i for i in old if i in after} == expected
    assert any(before[i][0] in lacking for i in expected)
    assert any(before[i][0].startswith("idem_bad_") for i in expected)
    assert len(after) == recent + len(expected) == recent + real["d1:d1_usage"]["kept"]
    # Recorded, and shown by status.
    store = open_state(ctx.settings)
    try:
        last = last_prunes(store)
    finally:
        store.dispose()
    assert last["d1:d1_usage"]["deleted"] == gone
    assert last["d1:d1_usage"]["status"] == "ok"
    status = json.loads(sluice(env, "status", "--json").stdout)
    assert status["prunes"]["d1:d1_usage"]["deleted"] == gone

    # Again: nothing left to delete; the kept rows are still kept.
    code, again = prune_json(env)
    assert code == 0 and again["d1:d1_usage"]["deleted"] == 0
    assert d1_rows(d1) == after


def test_a_sink_that_is_down_keeps_every_row(env: Env, workers: WorkerPool) -> None:
    _, _, d1 = ingest(env, workers, 1_000, d1_days=7)
    age(d1)
    before = d1_rows(d1)
    down = dict(env.vars, SLUICE_POSTGRES_URL="postgresql://sluice@127.0.0.1:1/nothing")
    # PostgreSQL (a sink, and the state store) is unreachable: nothing may go.
    code, out = prune_json(env, "--only", "d1", vars_=down)
    assert code == 3  # UNAVAILABLE
    assert out["d1:d1_usage"]["deleted"] == 0
    assert out["d1:d1_usage"]["status"] == "failed"
    assert "postgres" in " ".join(out["d1:d1_usage"]["notes"])
    assert d1_rows(d1) == before


def test_a_locked_sink_table_keeps_the_batch(env: Env, workers: WorkerPool) -> None:
    _, _, d1 = ingest(env, workers, 1_000, d1_days=7, batch_size=300, sink_timeout_seconds=1)
    age(d1)
    before = d1_rows(d1)
    locker = psycopg2.connect(libpq_dsn(env.pg_url))
    try:
        with locker.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
            t0 = time.monotonic()
            code, out = prune_json(env, "--only", "d1")
            took = time.monotonic() - t0
        locker.rollback()
    finally:
        locker.close()
    assert code == 3
    assert out["d1:d1_usage"]["deleted"] == 0 and out["d1:d1_usage"]["kept"] == 300
    assert "could not answer" in " ".join(out["d1:d1_usage"]["notes"])
    assert d1_rows(d1) == before
    assert took < 30
    # Once the lock is gone the same prune deletes what both sinks hold.
    code, out = prune_json(env, "--only", "d1")
    assert code == 0
    assert (
        out["d1:d1_usage"]["deleted"]
        == assert_deleted_only_what_sinks_hold(env, before, d1_rows(d1))
        > 800
    )


def test_prune_during_a_running_ingestion(env: Env, workers: WorkerPool) -> None:
    """Old processed rows are pruned while new rows of the same table are read, written and
    marked by real workers: nothing a sink lacks is deleted, and the ingestion completes."""
    ctx, sample, d1 = ingest(env, workers, 4_000, d1_days=7, batch_size=200)
    age(d1)
    # New rows arrive (copies of the sample under new ids and keys) and are ingested now.
    conn = sqlite3.connect(d1, isolation_level=None)
    conn.execute(
        "INSERT INTO usage_events (id, organisation_id, project_id, idempotency_key, metric_name,"
        " metric_value, unit, \"timestamp\", metadata) SELECT id || '-new', organisation_id,"
        " project_id, idempotency_key || '-new', metric_name, metric_value, unit, \"timestamp\","
        " metadata FROM usage_events"
    )
    conn.close()
    before = d1_rows(d1)
    lacking = sorted(sample.distinct_valid_keys)[:10]
    sink = sqlite3.connect(env.sqlite_path, isolation_level=None)
    sink.execute(
        f"DELETE FROM usage_events WHERE idempotency_key IN ({','.join('?' * len(lacking))})",
        lacking,
    )
    sink.close()

    errors: list[BaseException] = []

    def run() -> None:
        try:
            drain(ctx, "d1_usage", timeout=240)
        except BaseException as exc:
            errors.append(exc)

    ingestion = threading.Thread(target=run)
    ingestion.start()
    time.sleep(0.5)
    code, out = prune_json(env, "--only", "d1")
    ingestion.join()
    assert errors == []
    assert code == 0, out
    after = d1_rows(d1)
    gone = assert_deleted_only_what_sinks_hold(env, before, after)
    assert gone == out["d1:d1_usage"]["deleted"] > 3_000
    # Every new row was ingested and marked; none of them was old enough to go.
    new = {i for i in before if i.endswith("-new")}
    assert new <= set(after)
    assert all(after[i][1] is not None for i in new)
    assert {f"{k}-new" for k in sample.distinct_valid_keys} <= set(pg_keys(env.pg_url))


# -- the schedule --------------------------------------------------------------------------------


def test_beat_schedules_a_daily_prune_that_runs_in_a_worker(env: Env, workers: WorkerPool) -> None:
    ctx, _, d1 = ingest(env, workers, 1_000, d1_days=3)
    entry = beat_schedule(ctx.settings)["prune"]
    assert entry["task"] == "sluice.prune" and entry["options"]["queue"] == "produce"
    assert str(entry["schedule"]).startswith("<crontab: 30 3 * * *")
    age(d1)
    before = d1_rows(d1)
    app.send_task("sluice.prune", queue="produce")
    store = open_state(ctx.settings)
    try:
        deadline = time.monotonic() + 60
        while not (last := last_prunes(store)) and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        store.dispose()
    assert last["d1:d1_usage"]["status"] == "ok"
    assert (
        last["d1:d1_usage"]["deleted"]
        == assert_deleted_only_what_sinks_hold(env, before, d1_rows(d1))
        > 800
    )


def test_no_retention_schedules_no_prune(env: Env) -> None:
    env.write_config(d1_config(env.dir / "d1.sqlite"))
    assert "prune" not in beat_schedule(Settings.load(env.vars))


# -- through the D1 REST API ---------------------------------------------------------------------

DB_ID = "11111111-2222-3333-4444-555555555555"


def test_remote_prune_keeps_within_d1_limits(env: Env, workers: WorkerPool) -> None:
    """A remote D1 source pruned through the REST API (a fake D1 enforcing its limits: 100
    bound parameters, statement size): what a sink lacks stays, the rest goes."""
    with FakeD1() as fake:
        d1 = env.dir / "remote.sqlite"
        sample = write_d1_file(d1, 2_000)
        fake.add_database(DB_ID, d1)
        env.vars["TEST_D1_TOKEN"] = fake.token
        env.write_config(
            f"""
[pipeline]
page_size = 500

[sources.d1_usage]
kind = "d1"
stream = "usage_events"
mode = "remote"
account_id = "{fake.account_id}"
database_id = "{DB_ID}"
base_url = "{fake.base_url}"
api_token_env = "TEST_D1_TOKEN"
batch_size = 500
max_batches = 10
"""
            + retention(d1_days=2, batch_size=700)
        )
        ctx = app.configure(Settings.load(env.vars))
        migrate_sqlite(env.sqlite_path)
        workers.start("pg", PG_QUEUES, 2)
        workers.start_sqlite_writer()
        drain(ctx, "d1_usage")
        age(d1)
        lacking = sorted(sample.distinct_valid_keys)[:5]
        sink = sqlite3.connect(env.sqlite_path, isolation_level=None)
        sink.execute(
            f"DELETE FROM usage_events WHERE idempotency_key IN ({','.join('?' * 5)})", lacking
        )
        sink.close()
        before = d1_rows(d1)
        fake.requests.clear()
        code, dry = prune_json(env, "--only", "d1", "--dry-run")
        code, out = prune_json(env, "--only", "d1")
        assert code == 0, out
        gone = assert_deleted_only_what_sinks_hold(env, before, d1_rows(d1))
        assert gone == out["d1:d1_usage"]["deleted"] == dry["d1:d1_usage"]["deleted"] > 1_900
        assert {before[i][0] for i in d1_rows(d1)} >= set(lacking)
        statements = [
            s
            for r in fake.requests
            if isinstance(r.body, dict)
            for s in (r.body.get("batch") or [r.body])
        ]
        deletes = [s for s in statements if str(s.get("sql", "")).startswith("DELETE")]
        assert deletes and all(len(s.get("params") or []) <= 100 for s in statements)
        assert sum(len(s["params"]) - 1 for s in deletes) == 2 * gone  # rowid and id per row


# -- run history, dead letters, the cache table --------------------------------------------------


def history_totals(env: Env, ctx: Context) -> dict[str, Any]:
    """Everything the rollups must keep: per store, the sums over remaining rows plus daily
    totals, and what the metrics report."""
    engine = postgres_engine(env.pg_url)
    lite = sqlite3.connect(env.sqlite_path)
    try:
        cols = "received, inserted, duplicates, invalid, updated, unchanged, deleted, attempts"
        sums = ", ".join(f"sum({c})" for c in cols.split(", "))
        out: dict[str, Any] = {}
        q_pages = f"SELECT count(*), {sums} FROM ingestion_runs"
        q_daily = f"SELECT sum(pages), {sums} FROM ingestion_runs_daily"
        with engine.connect() as conn:
            out["pg_pages"] = [
                int(a or 0) + int(b or 0)
                for a, b in zip(
                    conn.execute(text(q_pages)).one(),
                    conn.execute(text(q_daily)).one(),
                    strict=True,
                )
            ]
            q_runs = "SELECT count(*), sum(pages), sum(records) FROM source_runs"
            q_rdaily = "SELECT sum(runs), sum(pages), sum(records) FROM source_runs_daily"
            out["runs"] = [
                int(a or 0) + int(b or 0)
                for a, b in zip(
                    conn.execute(text(q_runs)).one(),
                    conn.execute(text(q_rdaily)).one(),
                    strict=True,
                )
            ]
        out["lite_pages"] = [
            int(a or 0) + int(b or 0)
            for a, b in zip(
                lite.execute(q_pages).fetchone(), lite.execute(q_daily).fetchone(), strict=True
            )
        ]
        for name, totals in (("pg", postgres_totals(engine)), ("lite", sqlite_totals(lite))):
            out[f"metrics_{name}"] = {
                stream: (t.received, t.inserted, t.duplicates, t.invalid, t.pages, t.buckets)
                for stream, t in totals.items()
            }
        return out
    finally:
        engine.dispose()
        lite.close()


def backdate_history(env: Env, days: int, every: int) -> None:
    """Move every `every`-th page and run `days` days back (keeping their durations)."""
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    with conn, conn.cursor() as cur:
        shift = f"interval '{days} days'"
        cur.execute(
            f"UPDATE ingestion_runs SET started_at = started_at - {shift},"
            f" committed_at = committed_at - {shift} WHERE page_id IN (SELECT page_id FROM"
            f" (SELECT page_id, row_number() OVER (ORDER BY page_id) AS n FROM ingestion_runs) x"
            f" WHERE n % {every} = 0)"
        )
        cur.execute(
            f"UPDATE source_runs SET started_at = started_at - {shift},"
            f" finished_at = finished_at - {shift} WHERE run_id IN (SELECT run_id FROM"
            f" (SELECT run_id, row_number() OVER (ORDER BY run_id) AS n FROM source_runs) x"
            f" WHERE n % {every} = 0)"
        )
    conn.close()
    lite = sqlite3.connect(env.sqlite_path, isolation_level=None)
    lite.execute(
        "UPDATE ingestion_runs SET started_at = strftime('%Y-%m-%dT%H:%M:%fZ', started_at,"
        f" '-{days} days'), committed_at = strftime('%Y-%m-%dT%H:%M:%fZ', committed_at,"
        f" '-{days} days') WHERE rowid % {every} = 0"
    )
    lite.close()


def test_rollups_keep_history_and_metrics_exact(env: Env, workers: WorkerPool) -> None:
    ctx, _, _ = ingest(env, workers, 6_000, runs_days=5, batch_size=3)
    for _ in range(3):  # a few more runs: history of several runs, some empty
        run_source(ctx, "d1_usage")
    before = history_totals(env, ctx)
    assert before["pg_pages"][0] >= 12 and before["runs"][0] >= 4
    backdate_history(env, 9, 2)
    backdate_history(env, 30, 3)
    code, dry = prune_json(env, "--only", "runs", "--dry-run")
    assert code == 0
    code, out = prune_json(env, "--only", "runs")
    assert code == 0, out
    for target in ("source_runs", "ingestion_runs:postgres", "ingestion_runs:sqlite"):
        assert out[target]["deleted"] == dry[target]["deleted"] > 0, target
    after = history_totals(env, ctx)
    assert after == before
    # Rows of days already rolled up: added to the same daily rows.
    backdate_history(env, 9, 1)
    code, out = prune_json(env, "--only", "runs")
    assert code == 0 and all(out[t]["deleted"] > 0 for t in out)
    assert history_totals(env, ctx) == before
    with postgres_engine(env.pg_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ingestion_runs")).scalar() == 0
        days = conn.execute(text("SELECT DISTINCT day FROM ingestion_runs_daily")).all()
    assert len(days) >= 2


def test_resolved_letters_go_pending_stay(env: Env, workers: WorkerPool) -> None:
    # A longer retention for runs must not stretch the letters'.
    ingest(env, workers, 10_000, letters_days=7, runs_days=365, batch_size=2)
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM failed_ingestions ORDER BY id")
        ids = [r[0] for r in cur.fetchall()]
        assert len(ids) >= 8
        # Old: two discarded, two replayed, the rest pending; one recent discarded letter.
        plan = {ids[0]: "discarded", ids[1]: "discarded", ids[2]: "replayed", ids[3]: "replayed"}
        for i, status in plan.items():
            cur.execute("UPDATE failed_ingestions SET status = %s WHERE id = %s", (status, i))
        cur.execute(
            "UPDATE failed_ingestions SET last_failed_at = now() - interval '30 days'"
            " WHERE id <> %s",
            (ids[4],),
        )
        cur.execute("UPDATE failed_ingestions SET status = 'discarded' WHERE id = %s", (ids[4],))
    code, dry = prune_json(env, "--dry-run")
    code, out = prune_json(env)  # every kind: each keeps its own cutoff
    assert code == 0
    assert out["letters"]["deleted"] == dry["letters"]["deleted"] == 4
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id, status FROM failed_ingestions ORDER BY id")
        left = dict(cur.fetchall())
    conn.close()
    assert set(left) == set(ids) - set(plan)
    assert left[ids[4]] == "discarded"  # resolved, but not old enough
    assert sum(1 for s in left.values() if s == "pending") == len(ids) - 5


def test_expired_cache_rows_go(env: Env) -> None:
    env.write_config(retention(cache_days=1))
    migrate_sqlite(env.sqlite_path)
    now_ms = int(time.time() * 1000)
    rows = [
        ("expired-long-ago", now_ms - 10 * 86_400_000),
        ("expired-an-hour-ago", now_ms - 3_600_000),
        ("fresh", now_ms + 3_600_000),
    ]
    pg = psycopg2.connect(libpq_dsn(env.pg_url))
    with pg, pg.cursor() as cur:
        for key, expires in rows:
            cur.execute(
                "INSERT INTO cache (cache_key, cache_value, expires_at, updated_at)"
                " VALUES (%s, '{}', %s, %s)",
                (key, expires, now_ms),
            )
    lite = sqlite3.connect(env.sqlite_path, isolation_level=None)
    lite.executemany(
        "INSERT INTO cache (cache_key, cache_value, expires_at, updated_at) VALUES (?, '{}', ?, ?)",
        [(k, e, now_ms) for k, e in rows],
    )
    code, out = prune_json(env, "--only", "cache")
    assert code == 0, out
    assert out["cache:postgres"]["deleted"] == out["cache:sqlite"]["deleted"] == 1
    with pg, pg.cursor() as cur:
        cur.execute("SELECT cache_key FROM cache ORDER BY 1")
        assert [r[0] for r in cur.fetchall()] == ["expired-an-hour-ago", "fresh"]
    pg.close()
    assert [r[0] for r in lite.execute("SELECT cache_key FROM cache ORDER BY 1")] == [
        "expired-an-hour-ago",
        "fresh",
    ]
    lite.close()


def test_retention_overrides_name_d1_sources(env: Env) -> None:
    env.write_config(
        d1_config(env.dir / "d1.sqlite") + "\n[retention]\nsources = { nope = 2, d1_usage = 0 }\n"
    )
    r = sluice(env, "config", "check")
    assert r.returncode == 2
    assert "retention.sources.nope: not a configured D1 source (D1 sources: d1_usage)" in r.stderr


def test_status_shows_the_last_prune_of_each_target(env: Env) -> None:
    env.write_config(retention(letters_days=30, cache_days=2))
    migrate_sqlite(env.sqlite_path)
    code, _ = prune_json(env)
    assert code == 0
    text_ = sluice(env, "status").stdout
    section = text_.split("last prunes", 1)[1]
    for target in ("letters", "cache:postgres", "cache:sqlite"):
        assert f"  {target}" in section and "ok" in section
    assert "0 deleted, 0 kept" in section


def test_prune_during_ingestion_with_a_sink_table_locked(env: Env, workers: WorkerPool) -> None:
    """While real workers ingest new rows, PostgreSQL's table is locked (a long migration, say):
    the prune cannot learn what that sink holds, keeps its batch and stops (exit 3); once the
    lock is gone the ingestion completes and the next prune deletes what both sinks hold."""
    ctx, sample, d1 = ingest(env, workers, 2_000, d1_days=7, batch_size=250, sink_timeout_seconds=1)
    age(d1)
    conn = sqlite3.connect(d1, isolation_level=None)
    conn.execute(
        "INSERT INTO usage_events (id, organisation_id, project_id, idempotency_key, metric_name,"
        " metric_value, unit, \"timestamp\", metadata) SELECT id || '-new', organisation_id,"
        " project_id, idempotency_key || '-new', metric_name, metric_value, unit, \"timestamp\","
        " metadata FROM usage_events"
    )
    conn.close()
    before = d1_rows(d1)
    locker = psycopg2.connect(libpq_dsn(env.pg_url))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            drain(ctx, "d1_usage", timeout=240)
        except BaseException as exc:
            errors.append(exc)

    ingestion = threading.Thread(target=run)
    try:
        with locker.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE")
            ingestion.start()
            code, out = prune_json(env, "--only", "d1")
        locker.rollback()
    finally:
        locker.close()
    assert code == 3, out
    assert out["d1:d1_usage"]["deleted"] == 0 and out["d1:d1_usage"]["kept"] == 250
    assert d1_rows(d1) == {i: v for i, v in d1_rows(d1).items() if i in before}
    assert {i for i in before if i not in d1_rows(d1)} == set()
    ingestion.join()
    assert errors == []
    code, out = prune_json(env, "--only", "d1")
    assert code == 0, out
    after = d1_rows(d1)
    assert assert_deleted_only_what_sinks_hold(env, before, after) == out["d1:d1_usage"]["deleted"]
    assert out["d1:d1_usage"]["deleted"] > 1_900
    new = {i for i in before if i.endswith("-new")}
    assert new <= set(after) and all(after[i][1] is not None for i in new)
    assert {f"{k}-new" for k in sample.distinct_valid_keys} <= set(pg_keys(env.pg_url))


@pytest.mark.parametrize("indexed", [True, False], ids=["processed_at-index", "no-index"])
def test_the_walk_follows_the_tables_indexes(env: Env, indexed: bool) -> None:
    """With the shipped index on processed_at the prune reads only old rows, in that order;
    without it, one pass in rowid order. Either way: the same rows go."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 3_000)
    conn = sqlite3.connect(d1, isolation_level=None)
    if not indexed:
        conn.execute("DROP INDEX idx_usage_events_unprocessed")
    # Processed at various times, out of rowid order; the last 500 rows recently.
    conn.execute(
        "UPDATE usage_events SET processed_at = strftime('%Y-%m-%dT%H:%M:%fZ', '2020-01-01',"
        " '+' || ((rowid * 7919) % 1000) || ' minutes')"
    )
    conn.execute(
        "UPDATE usage_events SET processed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
        " WHERE rowid > 2500"
    )
    conn.close()
    env.write_config(d1_config(d1) + retention(d1_days=1, batch_size=128))
    settings = Settings.load(env.vars)
    migrate_sqlite(env.sqlite_path)
    lacking = load_sinks(d1, env.pg_url, env.sqlite_path, 20)
    before = d1_rows(d1)
    cfg = settings.source("d1_usage")
    assert isinstance(cfg, D1SourceConfig)
    table = open_table("d1_usage", cfg, settings.stream("usage_events"), settings)
    try:
        table.choose_order(table.plan(table.plan_sql(), [OLD, "", 0, 1]))
        assert table.by_age is indexed
    finally:
        table.close()
    (dry,) = run_prune(settings, only="d1", dry_run=True)
    (result,) = run_prune(settings, only="d1")
    after = d1_rows(d1)
    gone = assert_deleted_only_what_sinks_hold(env, before, after)
    assert gone == result.deleted == dry.deleted
    assert result.kept == dry.kept == len(after) - 500
    old = {i for i, (_, p) in before.items() if p is not None and p < "2021"}
    assert len(old) == 2_500
    held = set(pg_keys(env.pg_url)) & set(sqlite_keys(env.sqlite_path))
    assert {i for i in old if i in after} == {i for i in old if before[i][0] not in held}
    assert any(before[i][0] in lacking for i in old if i in after)


def test_the_remote_d1_sink_is_asked_too(env: Env, workers: WorkerPool) -> None:
    """A stream written to PostgreSQL and a remote D1 sink (the fake D1): the prune asks the
    D1 sink through its REST API, within 100 bound parameters, and keeps what it lacks."""
    from sluice.shared.cloudflare import D1Client
    from sluice.shared.migrations import migrate_d1

    with FakeD1() as fake:
        remote = env.dir / "remote-sink.sqlite"
        fake.add_database(DB_ID, remote)
        env.vars["TEST_D1_SINK_TOKEN"] = fake.token
        with D1Client(
            account_id=fake.account_id,
            database_id=DB_ID,
            api_token=fake.token,
            base_url=fake.base_url,
        ) as client:
            migrate_d1(client)
        d1 = env.dir / "d1.sqlite"
        sample = write_d1_file(d1, 1_500)
        env.write_config(
            d1_config(d1, page_size=500)
            + f"""
[streams.usage_events]
sinks = ["postgres", "d1"]

[sinks.d1]
account_id = "{fake.account_id}"
database_id = "{DB_ID}"
base_url = "{fake.base_url}"
api_token_env = "TEST_D1_SINK_TOKEN"
"""
            + retention(d1_days=3, batch_size=400)
        )
        ctx = app.configure(Settings.load(env.vars))
        workers.start("pg", PG_QUEUES, 2)
        workers.start("d1", ["ingest.d1"], 2)
        drain(ctx, "d1_usage")
        age(d1)
        lacking = sorted(sample.distinct_valid_keys)[:7]
        sink = sqlite3.connect(remote, isolation_level=None)
        sink.execute(
            f"DELETE FROM usage_events WHERE idempotency_key IN ({','.join('?' * 7)})", lacking
        )
        held_remote = {r[0] for r in sink.execute("SELECT idempotency_key FROM usage_events")}
        sink.close()
        before = d1_rows(d1)
        fake.requests.clear()
        code, out = prune_json(env, "--only", "d1")
        assert code == 0, out
        after = d1_rows(d1)
        held = held_remote & set(pg_keys(env.pg_url))
        gone = {i for i in before if i not in after}
        assert gone and all(before[i][0] in held for i in gone)
        assert {i for i in before if i in after} == {i for i in before if before[i][0] not in held}
        assert len(gone) == out["d1:d1_usage"]["deleted"]
        asked = [
            s
            for r in fake.requests
            if isinstance(r.body, dict)
            for s in (r.body.get("batch") or [r.body])
        ]
        assert asked and all(len(s.get("params") or []) <= 100 for s in asked)

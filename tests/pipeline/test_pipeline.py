"""End to end through real worker processes, real Redis, real PostgreSQL and SQLite files."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import RunSummary, run_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import (
    d1_config,
    d1_processed,
    drain,
    pg_keys,
    pg_rows,
    pg_scalar,
    sqlite_keys,
    wait_queues_empty,
)

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]


def configure(env: Env) -> Context:
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    return ctx


def assert_exact(env: Env, expected: set[str]) -> None:
    for name, keys in (("postgres", pg_keys(env.pg_url)), ("sqlite", sqlite_keys(env.sqlite_path))):
        assert set(keys) == expected, f"{name}: key set differs"
        assert max(keys.values()) == 1, f"{name}: a key was written twice"


def test_end_to_end_both_sinks_then_second_run_inserts_nothing(
    env: Env, workers: WorkerPool
) -> None:
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 20_000)
    env.write_config(d1_config(d1, page_size=500))
    ctx = configure(env)
    workers.start("pg", PG_QUEUES, 2)
    workers.start_sqlite_writer()

    runs = drain(ctx, "d1_usage")
    assert sum(r.records for r in runs) == 20_000
    assert_exact(env, sample.distinct_valid_keys)
    assert d1_processed(d1) == (20_000, 20_000)
    # A key read twice (a retried client call with a new id) keeps its first read in both
    # sinks, though its pages raced through the two workers and the writer's threads.
    source = sqlite3.connect(d1)
    first = dict(
        reversed(
            source.execute("SELECT idempotency_key, id FROM usage_events ORDER BY rowid").fetchall()
        )
    )
    source.close()
    lite = sqlite3.connect(env.sqlite_path)
    in_sqlite = dict(lite.execute("SELECT idempotency_key, id FROM usage_events").fetchall())
    lite.close()
    in_pg = dict(pg_rows(env.pg_url, "SELECT idempotency_key, id FROM usage_events"))
    assert in_pg == in_sqlite == {k: first[k] for k in in_pg}
    # Every invalid row is a dead letter, once per sink, naming the field.
    assert (
        pg_scalar(env.pg_url, "SELECT count(DISTINCT record_key) FROM failed_ingestions")
        == sample.invalid
    )
    assert (
        pg_scalar(
            env.pg_url, "SELECT count(*) FROM failed_ingestions WHERE error_message NOT LIKE '%:%'"
        )
        == 0
    )
    inserted = pg_scalar(
        env.pg_url, "SELECT sum(inserted) FROM ingestion_runs WHERE sink = 'postgres'"
    )
    assert inserted == len(sample.distinct_valid_keys)

    # Same rows in a fresh D1 file: everything is a duplicate, nothing new is written.
    write_d1_file(d1, 20_000)
    runs2 = drain(ctx, "d1_usage")
    assert sum(r.records for r in runs2) == 20_000
    ids = ",".join(f"'{r.run_id}'" for r in runs2)
    assert (
        pg_scalar(env.pg_url, f"SELECT sum(inserted) FROM ingestion_runs WHERE run_id IN ({ids})")
        == 0
    )
    assert_exact(env, sample.distinct_valid_keys)
    assert d1_processed(d1) == (20_000, 20_000)


def test_two_runs_at_once_enqueue_each_row_once(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 5_000)
    env.write_config(d1_config(d1, page_size=250, max_batches=100))
    ctx = configure(env)
    results: list[RunSummary] = []
    barrier = threading.Barrier(2)

    def go() -> None:
        barrier.wait()
        results.append(run_source(ctx, "d1_usage"))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["ok", "skipped"]
    assert sum(r.records for r in results) == 5_000
    # A later run, while those pages are still in flight, enqueues nothing again.
    assert run_source(ctx, "d1_usage").records == 0
    assert ctx.redis.llen("ingest.postgres") == 20
    assert ctx.redis.llen("ingest.sqlite") == 20


def test_sigkill_worker_mid_run_loses_and_duplicates_nothing(env: Env, workers: WorkerPool) -> None:
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 30_000)
    # A short visibility timeout so the killed worker's pages come back within the test, and a
    # short in-flight lease: a kill between kombu's BRPOP and its unacked record loses the
    # message itself (celery#7924); the lease makes the next run read those rows again.
    env.write_config(
        d1_config(d1, page_size=1000, max_batches=100, visibility_timeout=8, inflight_lease=30)
    )
    ctx = configure(env)
    victim = workers.start("victim", PG_QUEUES, 2)
    workers.start_sqlite_writer()
    assert run_source(ctx, "d1_usage").records == 30_000
    deadline = time.monotonic() + 60
    while pg_scalar(env.pg_url, "SELECT count(*) FROM ingestion_runs") < 3:
        assert time.monotonic() < deadline, "worker never committed a page"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the main process and its pool, mid-run
    victim.wait()
    workers.start("rescuer", PG_QUEUES, 2)
    drain(ctx, "d1_usage", timeout=180)
    assert_exact(env, sample.distinct_valid_keys)
    assert d1_processed(d1) == (30_000, 30_000)


def test_rows_stay_unprocessed_while_a_sink_is_down(env: Env, workers: WorkerPool) -> None:
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 3_000)
    # Should stopping the broken worker end in SIGKILL (a loaded machine: CI once saw its 9
    # retries stay in `unacked`), what it held comes back after the visibility timeout: 60 s here,
    # and a short in-flight lease has the next run re-read the rows meanwhile. A short visibility
    # timeout also caps the retry delays (at a tenth of it), so max_retries is raised to keep the
    # pages from being dead-lettered before the assertions below.
    env.write_config(
        d1_config(d1, page_size=500, inflight_lease=40, visibility_timeout=60, max_retries=60)
    )
    ctx = configure(env)
    down = dict(env.vars, SLUICE_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/nowhere")
    broken = WorkerPool(down, env.dir / "logs-down")
    broken.start("pg-down", PG_QUEUES, 1)
    workers.start_sqlite_writer()
    assert run_source(ctx, "d1_usage").records == 3_000
    time.sleep(4)
    # SQLite committed; PostgreSQL could not: no row may be marked processed yet.
    assert set(sqlite_keys(env.sqlite_path)) == sample.distinct_valid_keys
    assert d1_processed(d1) == (3_000, 0)
    assert len(pg_keys(env.pg_url)) == 0
    broken.stop(timeout=60)  # warm shutdown hands its waiting retries back to the queue
    workers.start("pg", PG_QUEUES, 2)
    drain(ctx, "d1_usage", timeout=180)
    wait_queues_empty(ctx)
    assert_exact(env, sample.distinct_valid_keys)
    assert d1_processed(d1) == (3_000, 3_000)
    # The invalid rows' dead letters waited on the queue while PostgreSQL was unreachable.
    dead = "SELECT count(DISTINCT record_key) FROM failed_ingestions"
    assert pg_scalar(env.pg_url, dead) == sample.invalid

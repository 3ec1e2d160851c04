"""Faults injected into real processes mid-run: the guarantees must hold afterwards.

Each test ends with the same check: every valid distinct key in each sink exactly once, and every
D1 row marked processed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sluice.ops.sample import Sample, write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import LOCK_SECONDS, run_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.embedded import ensure_postgres, ensure_redis, stop_services
from sluice.shared.migrations import migrate_postgres, migrate_sqlite
from sluice.shared.settings import PipelineConfig, Settings
from tests.conftest import Env
from tests.helpers import d1_config, d1_processed, drain, pg_keys, pg_rows, pg_scalar, sqlite_keys

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]


def start_run(
    env: Env, records: int, vt: int | None = None, lease: float | None = None
) -> tuple[Context, Sample, Path]:
    """The default settings unless a test says otherwise (and why)."""
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, records)
    defaults = PipelineConfig()
    env.write_config(
        d1_config(
            d1,
            page_size=1000,
            max_batches=10_000,
            visibility_timeout=vt,
            max_retries=30,
            inflight_lease=defaults.inflight_lease if lease is None else lease,
        )
    )
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    return ctx, sample, d1


def assert_exact(env: Env, sample: Sample, d1: Path) -> None:
    for name, keys in (("postgres", pg_keys(env.pg_url)), ("sqlite", sqlite_keys(env.sqlite_path))):
        assert set(keys) == sample.distinct_valid_keys, f"{name}: key set differs"
        assert max(keys.values()) == 1, f"{name}: a key was written twice"
    assert d1_processed(d1) == (sample.records, sample.records)
    # A key read more than once (a retried client call: another id) keeps the same row in both
    # sinks, whichever page reached each sink first (the first read; a page read again after
    # its lease ran out counts as read then).
    pg = dict(pg_rows(env.pg_url, "SELECT idempotency_key, id FROM usage_events"))
    lite = sqlite3.connect(env.sqlite_path)
    in_sqlite = dict(lite.execute("SELECT idempotency_key, id FROM usage_events").fetchall())
    lite.close()
    assert pg == in_sqlite


def wait_until(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def committed_pages(env: Env) -> int:
    return int(pg_scalar(env.pg_url, "SELECT count(*) FROM ingestion_runs"))  # type: ignore[arg-type]


def test_sigkill_workers_ten_times_during_200k_run(env: Env) -> None:
    # A worker killed between taking a message (BRPOP) and recording it as unacked loses that
    # page inside kombu (celery#7924); the in-flight lease re-reads its rows from D1, after
    # four hours by default: a short one here, so such a page shows within the test.
    ctx, sample, d1 = start_run(env, 200_000, lease=30)
    assert ctx.settings.pipeline.visibility_timeout == PipelineConfig().visibility_timeout
    assert run_source(ctx, "d1_usage").records == 200_000
    with WorkerPool(env.vars, env.dir / "logs", loglevel="WARNING") as pool:
        lite = pool.start_sqlite_writer("lite-0")
        for kill in range(10):
            pg = pool.start(f"pg-{kill}", PG_QUEUES, 2)
            before = committed_pages(env)
            wait_until(lambda b=before: committed_pages(env) >= b + 3)  # type: ignore[misc]
            victims = [pg] if kill % 2 else [pg, lite]  # the SQLite writer dies every other time
            for v in victims:
                os.killpg(v.pid, signal.SIGKILL)
                v.wait()
            if lite in victims:
                lite = pool.start_sqlite_writer(f"lite-{kill + 1}")
        pool.start("pg-final", PG_QUEUES, 2)
        last_kill = time.monotonic()
        drain(ctx, "d1_usage", timeout=300)
    print(f"\nten SIGKILLs: drained {time.monotonic() - last_kill:.1f}s after the last one")
    assert_exact(env, sample, d1)


def test_postgres_restarted_mid_run(env: Env, tmp_path: Path) -> None:
    pg_dir = tmp_path / "pg"
    url = ensure_postgres(pg_dir)
    try:
        migrate_postgres(url)
        env.vars["SLUICE_POSTGRES_URL"] = env.pg_url = url
        ctx, sample, d1 = start_run(env, 40_000)
        assert run_source(ctx, "d1_usage").records == 40_000
        with WorkerPool(env.vars, env.dir / "logs") as pool:
            pool.start("pg", PG_QUEUES, 2)
            pool.start_sqlite_writer()
            wait_until(lambda: committed_pages(env) >= 3)
            stop_services(pg_dir)
            time.sleep(3)  # pages fail and back off while the database is down
            assert ensure_postgres(pg_dir) == url
            back = time.monotonic()
            drain(ctx, "d1_usage", timeout=300)
        print(f"\npostgres restart: drained {time.monotonic() - back:.1f}s after it was back")
        assert_exact(env, sample, d1)
        assert "retry" in (env.dir / "logs" / "worker-pg.log").read_text()
    finally:
        stop_services(pg_dir)


def test_redis_restarted_mid_run_with_aof(env: Env, tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    url = ensure_redis(redis_dir)
    try:
        env.vars["SLUICE_BROKER_URL"] = url
        # Celery can lose the pages a worker was fetching when the broker goes away (celery#4354);
        # the in-flight lease is the safety net: those rows are still unprocessed in D1 and are
        # read again once the lease runs out. A short lease shows it within the test.
        ctx, sample, d1 = start_run(env, 40_000, lease=20)
        with WorkerPool(env.vars, env.dir / "logs") as pool:
            pool.start("pg", PG_QUEUES, 2)
            pool.start_sqlite_writer()
            assert run_source(ctx, "d1_usage").records == 40_000
            wait_until(lambda: committed_pages(env) >= 3)
            stop_services(redis_dir)  # SHUTDOWN: the AOF is flushed, queued pages kept
            time.sleep(2)
            assert ensure_redis(redis_dir) == url
            back = time.monotonic()
            # Celery 5.7 workers sometimes exit on the reconnect ("Unrecoverable error");
            # production runs them under a supervisor (compose: restart), so does this test.
            drain(ctx, "d1_usage", timeout=300, tick=pool.restart_dead)
        print(f"\nredis restart: drained {time.monotonic() - back:.1f}s after it was back")
        assert_exact(env, sample, d1)
    finally:
        stop_services(redis_dir)


def test_a_killed_produce_run_frees_its_source_within_the_default_lease(env: Env) -> None:
    ctx, sample, d1 = start_run(env, 200_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.ops.cli", "produce", "d1_usage"],
        env=env.vars,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: ctx.progress.in_flight("d1_usage") >= 3)
        assert run_source(ctx, "d1_usage").status == "skipped"  # the run is alive: locked out
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = time.monotonic()
    while (s := run_source(ctx, "d1_usage", max_batches=1)).status == "skipped":
        assert time.monotonic() - killed < LOCK_SECONDS + 5, "the dead run still holds the source"
        time.sleep(0.5)
    freed = time.monotonic() - killed
    print(f"\nkilled produce run: its source free again after {freed:.1f}s (lease {LOCK_SECONDS}s)")
    assert s.status == "ok" and s.pages == 1
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", PG_QUEUES, 2)
        pool.start_sqlite_writer()
        drain(ctx, "d1_usage", timeout=300)
    assert_exact(env, sample, d1)

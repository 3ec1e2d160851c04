"""Redelivery follows the worker's life: a dead worker's pages move again within two minutes with
the default settings, and a live worker's pages are never handed to another, however long they
take (warm shutdown included).

PostgreSQL holds a lock on the sink table, so the worker's writes wait as a slow page would.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import redis

from sluice.ops.sample import Sample, write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn
from sluice.shared.heartbeat import heartbeat_interval
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import PipelineConfig, Settings
from tests.conftest import Env
from tests.helpers import d1_config, d1_processed, drain, pg_keys, pg_scalar, sqlite_keys

PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]


def setup(env: Env, records: int, vt: int | None = None) -> tuple[Context, Sample, Path]:
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, records)
    env.write_config(d1_config(d1, page_size=1000, max_batches=100, visibility_timeout=vt))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    return ctx, sample, d1


@contextmanager
def table_locked(env: Env) -> Iterator[Callable[[], None]]:
    """Hold a lock that makes every insert into usage_events wait; yields its release."""
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    with conn.cursor() as cur:
        cur.execute("LOCK TABLE usage_events IN SHARE ROW EXCLUSIVE MODE")
    try:
        yield conn.rollback
    finally:
        conn.rollback()
        conn.close()


def waiting_writes(env: Env) -> int:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'sluice-postgres-sink' AND wait_event_type = 'Lock'"
    )
    return int(pg_scalar(env.pg_url, sql))  # type: ignore[arg-type]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


def received(log: Path) -> list[str]:
    """The ids of the ingest tasks a worker took, once per delivery."""
    return re.findall(r"Task sluice\.ingest\[([0-9a-f-]+)\] received", log.read_text())


def assert_exact(env: Env, sample: Sample, d1: Path) -> None:
    for name, keys in (("postgres", pg_keys(env.pg_url)), ("sqlite", sqlite_keys(env.sqlite_path))):
        assert set(keys) == sample.distinct_valid_keys, f"{name}: key set differs"
        assert max(keys.values()) == 1, f"{name}: a key was written twice"
    assert d1_processed(d1) == (sample.records, sample.records)


def test_a_slow_page_on_a_live_worker_is_never_delivered_twice(env: Env) -> None:
    # A 6 s visibility timeout (a heartbeat every second) and a page held for 60 s: ten times
    # the timeout, as a ten-minute page is with the default minute.
    ctx, sample, d1 = setup(env, 1000, vt=6)
    assert heartbeat_interval(6) == 1
    broker = redis.Redis.from_url(env.redis_url)
    logs = env.dir / "logs"
    with WorkerPool(env.vars, logs) as pool, table_locked(env) as release:
        worker = pool.start("pg", PG_QUEUES, 1)
        assert run_source(ctx, "d1_usage").pages == 1
        wait_until(lambda: waiting_writes(env) == 1, "the page's write waits on the lock")
        held = time.monotonic()
        terminated = False
        while time.monotonic() - held < 60:
            if not terminated and time.monotonic() - held > 40:
                worker.send_signal(signal.SIGTERM)  # warm shutdown: it finishes its page first
                terminated = True
            assert broker.llen("ingest.postgres") == 0, "the page went back to its queue"
            assert broker.hlen("unacked") == 1, "the worker no longer holds its page"
            assert waiting_writes(env) == 1
            time.sleep(0.5)
        assert worker.poll() is None, "warm shutdown waits for the page"
        release()
        worker.wait(60)
    assert len(received(logs / "worker-pg.log")) == 1, "the page was delivered twice"
    assert broker.hlen("unacked") == 0 and broker.llen("ingest.postgres") == 0
    assert set(pg_keys(env.pg_url)) == sample.distinct_valid_keys
    with WorkerPool(env.vars, logs) as pool:
        pool.start("pg-2", PG_QUEUES, 1)
        pool.start_sqlite_writer()
        drain(ctx, "d1_usage")
    assert received(logs / "worker-pg-2.log") == [], "the page was delivered twice"
    assert_exact(env, sample, d1)
    broker.close()


def test_a_killed_workers_pages_move_again_within_two_minutes_by_default(env: Env) -> None:
    ctx, sample, d1 = setup(env, 10_000)
    vt = ctx.settings.pipeline.visibility_timeout
    assert vt == PipelineConfig().visibility_timeout
    broker = redis.Redis.from_url(env.redis_url, decode_responses=True)
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        with table_locked(env) as release:
            victim = pool.start("pg", PG_QUEUES, 2)
            assert run_source(ctx, "d1_usage").pages == 10
            wait_until(lambda: waiting_writes(env) == 2, "two pages' writes wait on the lock")
            taken = set(broker.hkeys("unacked"))
            assert len(taken) >= 2
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            killed = time.monotonic()
            release()
            pool.start("pg-2", PG_QUEUES, 2)
            pool.start_sqlite_writer()
        wait_until(
            lambda: not taken & set(broker.hkeys("unacked")),
            "the dead worker's pages back on their queue",
            timeout=180,
        )
        moved = time.monotonic() - killed
        drain(ctx, "d1_usage", timeout=300)
        done = time.monotonic() - killed
    print(
        f"\nSIGKILLed worker ({len(taken)} pages held, default visibility timeout {vt}s):"
        f" its pages back on their queue after {moved:.1f}s, all committed after {done:.1f}s"
    )
    assert moved < 120
    assert_exact(env, sample, d1)
    broker.close()

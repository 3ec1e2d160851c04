"""Shared test helpers: configs, draining the pipeline, reading what landed."""

from __future__ import annotations

import base64
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import psycopg2

from sluice.ops.status import total_depth
from sluice.producers.produce import RunSummary, run_source
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn


def d1_config(
    d1_path: Path,
    *,
    page_size: int = 500,
    max_batches: int = 10,
    visibility_timeout: int | None = None,
    max_retries: int = 8,
    inflight_lease: float = 14400,
    source: str = "d1_usage",
) -> str:
    # No visibility timeout unless asked: the default, as deployed.
    vt = "" if visibility_timeout is None else f"visibility_timeout = {visibility_timeout}\n"
    return f"""
[pipeline]
page_size = {page_size}
{vt}max_retries = {max_retries}
inflight_lease = {inflight_lease}

[sources.{source}]
kind = "d1"
stream = "usage_events"
path = "{d1_path}"
batch_size = {page_size}
max_batches = {max_batches}
"""


def drain(
    ctx: Context, source: str, timeout: float = 120, tick: Callable[[], object] | None = None
) -> list[RunSummary]:
    """Run the source until it is empty and every page is committed and acknowledged.
    `tick` runs between runs (e.g. a supervisor restarting dead workers)."""
    runs = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        # Idle before the run, nothing found by it: caught up. (A run made while pages were in
        # flight resumes after them, so finding nothing then proves nothing: an HTTP window
        # acknowledged before an earlier one leaves its cursor behind, to be fetched again.)
        idle = ctx.progress.in_flight(source) == 0 and total_depth(ctx.redis) == 0
        s = run_source(ctx, source)
        assert s.status == "ok", s.error
        runs.append(s)
        if s.pages == 0 and idle:
            return runs
        if s.pages == 0:
            time.sleep(0.2)
    raise AssertionError(
        f"pipeline did not drain within {timeout}s "
        f"(in flight: {ctx.progress.in_flight(source)}, "
        f"queued: {total_depth(ctx.redis)})"
    )


def wait_queues_empty(ctx: Context, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while total_depth(ctx.redis) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert total_depth(ctx.redis) == 0


def pg_keys(pg_url: str, table: str = "usage_events", key: str = "idempotency_key") -> Counter[str]:
    conn = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT {key} FROM {table}")
            return Counter(r[0] for r in cur.fetchall())
    finally:
        conn.close()


def pg_rows(pg_url: str, sql: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def pg_scalar(pg_url: str, sql: str) -> object:
    conn = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def sqlite_keys(
    path: Path, table: str = "usage_events", key: str = "idempotency_key"
) -> Counter[str]:
    conn = sqlite3.connect(path)
    try:
        return Counter(r[0] for r in conn.execute(f"SELECT {key} FROM {table}"))
    finally:
        conn.close()


def d1_processed(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        total, done = conn.execute(
            "SELECT count(*), count(processed_at) FROM usage_events"
        ).fetchone()
        return int(total), int(done)
    finally:
        conn.close()


TASK_QUEUES = ("ingest.postgres", "ingest.sqlite", "dead_letter", "progress")


def run_queued_tasks(ctx: Context, shuffle: random.Random | None = None) -> int:
    """Run every task waiting on the pipeline's queues in this process, as workers would, until
    none is left (tasks queue more: dead letters, acknowledgements). With `shuffle`, messages
    are taken from the queues in a random order: pages then reach the sinks out of order, as
    they do with many workers. Returns the number of tasks run."""
    from sluice.shared.celery_app import app

    app.loader.import_default_modules()  # the task modules, as a worker loads them
    ran = 0
    while True:
        waiting = [q for q in TASK_QUEUES if ctx.redis.llen(q)]
        if not waiting:
            return ran
        queue = shuffle.choice(waiting) if shuffle else waiting[0]
        newest_first = shuffle is not None and shuffle.random() < 0.5
        raw = ctx.redis.lpop(queue) if newest_first else ctx.redis.rpop(queue)
        assert raw is not None
        message = json.loads(raw)
        body = base64.b64decode(message["body"])
        if message["content-type"] == "application/x-msgpack":
            args, kwargs, _ = msgpack.unpackb(body, raw=False)
        else:
            args, kwargs, _ = json.loads(body)
        app.tasks[message["headers"]["task"]].apply(args=args, kwargs=kwargs).get()
        ran += 1

"""`sluice status` as operators run it: real workers, real Redis, PostgreSQL and SQLite; and the
RabbitMQ queue depths against this machine's RabbitMQ when it answers."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from sluice.ops.sample import write_d1_file
from sluice.ops.status import amqp_queue_depths, queue_depths
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import QUEUES, app
from sluice.shared.database import sqlite_connect
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env, _port_open
from tests.helpers import d1_config, drain, pg_scalar
from tests.test_cli import sluice

PG_QUEUES = ["dead_letter", "ingest.postgres", "progress"]
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def workers(env: Env) -> Iterator[WorkerPool]:
    pool = WorkerPool(env.vars, env.dir / "logs")
    yield pool
    pool.stop()


def status_json(env: dict[str, str]) -> dict[str, object]:
    r = sluice("status", "--json", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


def test_status_during_and_after_a_run(env: Env, workers: WorkerPool) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 3_000)
    env.write_config(d1_config(d1, page_size=500))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)

    # During: the run enqueued 6 pages per sink and no worker is up yet.
    assert run_source(ctx, "d1_usage").pages == 6
    doc = status_json(env.vars)
    assert doc["errors"] == {}
    queues = doc["queues"]
    assert isinstance(queues, dict)
    assert queues["ingest.postgres"] == {"waiting": 6, "unacked": 0, "total": 6}
    assert queues["ingest.sqlite"] == {"waiting": 6, "unacked": 0, "total": 6}
    src = doc["sources"]["d1_usage"]  # type: ignore[index]
    assert src["last_run"]["status"] == "ok"
    assert (src["last_run"]["pages"], src["last_run"]["records"]) == (6, 3_000)
    assert src["unprocessed"] == 3_000
    assert src["pages_in_flight"] == 6
    assert src["lag_seconds"] is None  # nothing committed yet
    assert doc["workers"] == {}
    assert doc["dead_letters"] == {"pending": 0, "by_stream": []}

    # After: workers drained everything; invalid rows are dead letters, once per sink.
    workers.start("pg", PG_QUEUES, 2)
    workers.start("lite", ["ingest.sqlite"], 1)
    drain(ctx, "d1_usage")
    doc = status_json(env.vars)
    assert doc["errors"] == {}
    assert all(q["total"] == 0 for q in doc["queues"].values())  # type: ignore[attr-defined]
    dl = doc["dead_letters"]
    assert isinstance(dl, dict)
    pending = pg_scalar(env.pg_url, "SELECT count(*) FROM failed_ingestions WHERE status='pending'")
    assert dl["pending"] == pending and pending
    expected = pg_scalar(
        env.pg_url,
        "SELECT json_agg(x ORDER BY x) FROM (SELECT stream || '/' || sink || '/' || error_class"
        " || '=' || count(*) AS x FROM failed_ingestions WHERE status = 'pending'"
        " GROUP BY stream, sink, error_class) t",
    )
    got = sorted(
        f"{d['stream']}/{d['sink']}/{d['error_class']}={d['count']}" for d in dl["by_stream"]
    )
    assert got == expected
    assert {d["sink"] for d in dl["by_stream"]} == {"postgres", "sqlite"}

    src = doc["sources"]["d1_usage"]  # type: ignore[index]
    assert src["unprocessed"] == 0 and src["pages_in_flight"] == 0
    assert src["last_run"]["status"] == "ok"
    assert src["lag_seconds"] > 0  # the sample's event times are in the past
    assert 0 <= src["last_commit_seconds_ago"] < 120

    host = socket.gethostname()
    w = doc["workers"]
    assert isinstance(w, dict)
    assert set(w) == {f"pg@{host}", f"lite@{host}"}
    assert w[f"pg@{host}"]["concurrency"] == 2
    assert w[f"pg@{host}"]["queues"] == PG_QUEUES
    assert w[f"lite@{host}"]["concurrency"] == 1
    assert w[f"lite@{host}"]["queues"] == ["ingest.sqlite"]

    text = sluice("status", env=env.vars, timeout=60)
    assert text.returncode == 0, text.stderr
    assert f"dead letters pending: {pending}" in text.stdout
    assert "workers online: 2" in text.stdout
    assert "d1_usage" in text.stdout and "ingest.sqlite" in text.stdout


def test_status_reports_what_it_can_when_postgres_is_down(env: Env) -> None:
    down = dict(env.vars, SLUICE_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/x")
    doc = status_json(down)
    assert "postgres" in doc["errors"]  # type: ignore[operator]
    assert doc["queues"] is not None and doc["workers"] == {}
    assert doc["dead_letters"] == {"pending": None, "by_stream": None}


@pytest.mark.skipif(not _port_open(5672), reason="no RabbitMQ on 127.0.0.1:5672")
def test_rabbitmq_queue_depths() -> None:
    from kombu import Connection, Exchange, Producer, Queue

    tag = uuid.uuid4().hex[:8]
    full, empty, missing = (f"sluice-test-{tag}-{n}" for n in ("full", "empty", "missing"))
    with Connection(RABBITMQ, connect_timeout=5) as conn:
        channel = conn.channel()
        queues = [Queue(n, Exchange(""), routing_key=n, channel=channel) for n in (full, empty)]
        for q in queues:
            q.declare()
        try:
            producer = Producer(channel)
            for i in range(3):
                producer.publish({"i": i}, routing_key=full, serializer="json")
            # Publishes are asynchronous (no confirms): the broker counts them a moment later.
            deadline = time.monotonic() + 10
            depths = amqp_queue_depths(RABBITMQ, [full, empty, missing])
            while depths[full]["waiting"] != 3 and time.monotonic() < deadline:
                time.sleep(0.1)
                depths = amqp_queue_depths(RABBITMQ, [full, empty, missing])
            assert depths[full] == {"waiting": 3, "unacked": None, "total": 3}
            assert depths[empty] == {"waiting": 0, "unacked": None, "total": 0}
            assert depths[missing] == {"waiting": 0, "unacked": None, "total": 0}
        finally:
            for q in queues:
                q.delete()


@pytest.mark.skipif(not _port_open(5672), reason="no RabbitMQ on 127.0.0.1:5672")
def test_status_with_a_rabbitmq_broker(env: Env) -> None:
    # Page tracking stays on Redis (SLUICE_REDIS_URL); only reads are made on RabbitMQ.
    doc = status_json(dict(env.vars, SLUICE_BROKER_URL=RABBITMQ, SLUICE_REDIS_URL=env.redis_url))
    assert doc["broker"] == "amqp"
    assert doc["errors"] == {}
    queues = doc["queues"]
    assert isinstance(queues, dict)
    assert list(queues) == list(QUEUES)
    assert all(q["unacked"] is None and q["total"] == q["waiting"] for q in queues.values())


def test_a_threads_writer_holds_one_page_per_thread(env: Env, workers: WorkerPool) -> None:
    """A threads pool reserves no page beyond the one each thread holds: the SQLite writer's
    memory is bounded by its thread count, not by a prefetch multiple of it."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 3_000)
    env.write_config(
        d1_config(d1, page_size=250, max_batches=20).replace(
            "[pipeline]\n", "[pipeline]\nsqlite_busy_timeout_ms = 120000\n"
        )
    )
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    lock = sqlite_connect(env.sqlite_path)
    lock.execute("BEGIN IMMEDIATE")  # every page the writer takes waits here
    try:
        workers.start("lite", ["ingest.sqlite"], 3, extra=["--pool", "threads"])
        assert run_source(ctx, "d1_usage").pages == 12
        deadline = time.monotonic() + 30
        while queue_depths(ctx.redis)["ingest.sqlite"]["unacked"] < 3:
            assert time.monotonic() < deadline, queue_depths(ctx.redis)
            time.sleep(0.1)
        time.sleep(2)  # a prefetch would have reserved more by now
        assert queue_depths(ctx.redis)["ingest.sqlite"] == {"waiting": 9, "unacked": 3, "total": 12}
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    deadline = time.monotonic() + 60
    while queue_depths(ctx.redis)["ingest.sqlite"]["total"]:
        assert time.monotonic() < deadline, queue_depths(ctx.redis)
        time.sleep(0.2)
    lite = sqlite_connect(env.sqlite_path)
    assert lite.execute("SELECT count(*) FROM ingestion_runs").fetchone()[0] == 12
    lite.close()

"""`sluice status` as operators run it: real workers, real Redis, PostgreSQL and SQLite; and the
RabbitMQ queue depths against this machine's RabbitMQ when it answers. The report is data first:
a report made by hand renders and serialises with no server at all."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from sluice.ops.sample import write_d1_file
from sluice.ops.status import amqp_queue_depths, queue_depths, render_status, source_status
from sluice.ops.status_report import (
    DeadLetterGroup,
    LastRun,
    QueueDepth,
    SourceReport,
    StatusReport,
    WorkerReport,
)
from sluice.ops.workers import WorkerPool
from sluice.producers.d1_source import D1Status
from sluice.producers.http_source import HttpStatus
from sluice.producers.kv_source import KvStatus, MigrationProgress
from sluice.producers.produce import run_source
from sluice.shared.celery_app import QUEUES, app
from sluice.shared.database import postgres_engine, sqlite_connect
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import StateStore
from tests.conftest import Env, _port_open
from tests.helpers import d1_config, drain, pg_scalar
from tests.ops.test_cli import sluice
from tests.ops.test_worker_roles import wait_online

PG_QUEUES = ["dead_letter", "ingest.postgres", "progress"]
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def status_json(env: dict[str, str], code: int = 0) -> dict[str, object]:
    """`sluice status --json`; it exits 1 when the report lists a problem, 3 when a store is
    unreachable."""
    r = sluice("status", "--json", env=env, timeout=60)
    assert r.returncode == code, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


def test_status_during_and_after_a_run(env: Env, workers: WorkerPool) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 3_000)
    env.write_config(d1_config(d1, page_size=500))
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)

    # During: the run enqueued 6 pages per sink and no worker is up yet: a problem, said.
    assert run_source(ctx, "d1_usage").pages == 6
    doc = status_json(env.vars, code=1)
    assert doc["errors"] == {} and doc["ok"] is False and doc["unreachable"] == {}
    assert doc["problems"] == [
        "no worker consumes dead_letter",
        "no worker consumes ingest.postgres (6 pages waiting)",
        "no worker consumes ingest.sqlite (6 pages waiting)",
        "no worker consumes progress",
    ]
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
    # The backlog's age: since the event time of the oldest row not processed yet.
    oldest = sqlite3.connect(d1).execute("SELECT min(timestamp) FROM usage_events").fetchone()[0]
    age = (datetime.now(UTC) - datetime.fromisoformat(oldest)).total_seconds()
    assert age - 60 < src["backlog_age_seconds"] <= age
    assert src["oldest_unprocessed"] == datetime.fromisoformat(oldest).isoformat()
    assert doc["workers"] == {}
    assert doc["dead_letters"] == {"pending": 0, "by_stream": []}

    # After: workers drained everything; invalid rows are dead letters, once per sink, and
    # pending dead letters are the one problem left.
    workers.start("pg", PG_QUEUES, 2, by_role=True)
    workers.start("lite", ["ingest.sqlite"], 1, by_role=True)
    drain(ctx, "d1_usage")
    doc = status_json(env.vars, code=1)
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
    assert doc["problems"] == [f"{pending} dead letters pending"]

    src = doc["sources"]["d1_usage"]  # type: ignore[index]
    assert src["unprocessed"] == 0 and src["pages_in_flight"] == 0
    assert src["backlog_age_seconds"] == 0 and src["oldest_unprocessed"] is None  # caught up
    assert src["last_run"]["status"] == "ok"
    assert src["lag_seconds"] > 0  # the sample's event times are in the past
    assert 0 <= src["last_commit_seconds_ago"] < 120

    # Workers started with no --hostname are named, and listed, by role.
    host = socket.gethostname()
    pg, lite = f"postgres@{host}", f"sqlite@{host}"
    w = doc["workers"]
    assert isinstance(w, dict)
    assert set(w) == {pg, lite}
    assert doc["roles"] == {"postgres": [pg], "sqlite": [lite]}
    assert (w[pg]["role"], w[pg]["concurrency"], w[pg]["queues"]) == ("postgres", 2, PG_QUEUES)
    assert (w[lite]["role"], w[lite]["concurrency"]) == ("sqlite", 1)
    assert w[lite]["queues"] == ["ingest.sqlite"]

    text = sluice("status", env=env.vars, timeout=60)
    assert text.returncode == 1, text.stderr
    assert f"dead letters pending: {pending}" in text.stdout
    assert "workers online: 2" in text.stdout
    lines = text.stdout.splitlines()
    assert any(line.split()[:3] == ["postgres", pg, "prefork"] for line in lines)
    assert any(line.split()[:2] == ["sqlite", lite] for line in lines)
    assert text.stdout.rstrip().endswith(f"problems:\n  {pending} dead letters pending")
    assert "d1_usage" in text.stdout and "ingest.sqlite" in text.stdout


def test_status_reports_what_it_can_when_postgres_is_down(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(d1_config(d1))
    migrate_sqlite(env.sqlite_path)
    down = dict(env.vars, SLUICE_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/x")
    doc = status_json(down, code=3)  # unreachable, not merely a problem
    assert "postgres" in doc["errors"]  # type: ignore[operator]
    assert list(doc["unreachable"]) == ["postgres"]  # type: ignore[call-overload]
    assert doc["ok"] is False and doc["problems"][0] == "postgres unreachable"  # type: ignore[index]
    assert doc["queues"] is not None and doc["workers"] == {}
    assert doc["dead_letters"] == {"pending": None, "by_stream": None}
    src = doc["sources"]["d1_usage"]  # type: ignore[index]
    assert src["last_run"] is None and src["runs_unknown"] == "postgres unreachable"
    assert src["unprocessed"] == 10  # read from the source itself

    text = sluice("status", env=down, timeout=60)
    assert text.returncode == 3
    assert "dead letters pending: unknown: postgres unreachable" in text.stdout
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("  d1_usage "))
    assert line.endswith("unknown: postgres unreachable") and "never ran" not in text.stdout


def test_status_says_the_broker_is_unreachable(env: Env) -> None:
    """Redis down: the queues, the workers and the pages in flight are unknown, said once."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(d1_config(d1))
    migrate_sqlite(env.sqlite_path)
    down = dict(env.vars, SLUICE_BROKER_URL="redis://127.0.0.1:1/0")
    text = sluice("status", env=down, timeout=120)
    assert text.returncode == 3, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "queues: unknown: redis unreachable"
    assert "workers: unknown: redis unreachable" in lines
    assert "dead letters pending: 0" in lines  # PostgreSQL still answers
    assert lines[lines.index("problems:") + 1 :][:2] == ["  redis unreachable", ""]


def test_status_says_a_sqlite_state_store_is_unreachable(env: Env) -> None:
    """A deployment without PostgreSQL keeps its runs in the SQLite file: when that file cannot
    be read, the runs are unknown, not "never ran", and status exits 3."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.vars.pop("SLUICE_POSTGRES_URL")
    env.write_config(d1_config(d1) + '\n[streams.usage_events]\nsinks = ["sqlite"]\n')
    gone = dict(env.vars, SLUICE_SQLITE_PATH=str(env.dir / "missing" / "sink.sqlite"))
    doc = status_json(gone, code=3)
    assert doc["state"] == "sqlite" and list(doc["unreachable"]) == ["sqlite"]  # type: ignore[call-overload]
    assert doc["sources"]["d1_usage"]["runs_unknown"] == "sqlite unreachable"  # type: ignore[index]
    assert not (env.dir / "missing").exists()  # status never creates the file


def test_a_source_without_its_token_here_does_not_fail_status(
    env: Env, workers: WorkerPool
) -> None:
    """A remote D1 source whose API token is only in the workers' environment: status opens it
    all the same, says what it cannot know for that source alone, and exits 0."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(
        d1_config(d1)
        + '\n[sources.remote]\nkind = "d1"\nstream = "usage_events"\nmode = "remote"\n'
        'account_id = "acc"\ndatabase_id = "db"\napi_token_env = "SLUICE_TEST_NO_SUCH_TOKEN"\n'
    )
    migrate_sqlite(env.sqlite_path)
    workers.start("pg", PG_QUEUES, 1, by_role=True)
    workers.start("lite", ["ingest.sqlite"], 1, by_role=True)
    app.configure(Settings.load(env.vars))
    host = socket.gethostname()
    wait_online([f"postgres@{host}", f"sqlite@{host}"])
    doc = status_json(env.vars, code=0)
    assert doc["problems"] == [] and doc["errors"] == {}
    remote = doc["sources"]["remote"]  # type: ignore[index]
    why = "remote D1 needs an API token in $SLUICE_TEST_NO_SUCH_TOKEN"
    assert remote["unknown"] == {"unprocessed": why} and remote["errors"] == {}
    assert remote["mode"] == "remote" and remote["backlog_age_seconds"] is None
    assert doc["sources"]["d1_usage"]["unprocessed"] == 10  # type: ignore[index]
    text = sluice("status", env=env.vars, timeout=60)
    assert text.returncode == 0
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("  remote "))
    assert line.endswith(f"never ran; unknown here: {why}")


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
    # Page tracking stays on Redis (SLUICE_REDIS_URL); only reads are made on RabbitMQ. No
    # worker runs: that is the one problem.
    migrate_sqlite(env.sqlite_path)
    rabbit = dict(env.vars, SLUICE_BROKER_URL=RABBITMQ, SLUICE_REDIS_URL=env.redis_url)
    doc = status_json(rabbit, code=1)
    assert doc["broker"] == "amqp"
    assert doc["errors"] == {} and doc["unreachable"] == {}
    assert all(p.startswith("no worker consumes") for p in doc["problems"])  # type: ignore[attr-defined]
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


def test_a_report_made_by_hand_renders_and_serialises_without_any_server() -> None:
    """Gathering and showing are apart: rendering reads nothing, and the JSON document needs no
    help to serialise."""
    now = datetime(2026, 11, 26, 15, 47, tzinfo=UTC)
    usage = SourceReport(
        name="usage",
        kind="d1",
        stream="usage_events",
        own=D1Status(
            mode="local",
            capture="mark",
            unprocessed=10_000,
            oldest_unprocessed=now - timedelta(hours=5),
        ),
        lag_seconds=365 * 86400 + 22 * 3600.0,
        backlog_age_seconds=5 * 3600.0,
        newest_record=now - timedelta(days=365, hours=22),
        last_commit=now - timedelta(seconds=2),
        last_commit_seconds_ago=2.0,
        pages_in_flight=10,
        oldest_in_flight_seconds=4.5,
        last_run=LastRun("r1", "ok", 10, 10_000, now - timedelta(seconds=3), 0.393, None, 0),
    )
    prices = SourceReport(
        name="prices",
        kind="binance",
        stream="historical_prices",
        own=HttpStatus(cursors={"BTCUSDT": now - timedelta(hours=3)}),
        lag_seconds=10_800.0,
        backlog_age_seconds=10_800.0,
        pages_in_flight=0,
        oldest_in_flight_seconds=None,
    )
    migration = MigrationProgress("complete", 5, 0, 9, 1, 3, 3, now, now)
    bot = SourceReport(
        name="bot",
        kind="kv",
        stream="users",
        own=KvStatus(mode="remote", streams=["users", "cache"], migration=migration),
        last_run=LastRun("r2", "failed", 0, 0, now - timedelta(minutes=2), 1.5, "boom", 2),
    )
    report = StatusReport(
        time=now,
        broker="redis",
        state="postgres",
        queues={"ingest.postgres": QueueDepth(0, 0, 0), "ingest.sqlite": QueueDepth(10, 2, 12)},
        dead_letters=[DeadLetterGroup("usage_events", "sqlite", "ValidationError", 8, None, now)],
        sources={"bot": bot, "prices": prices, "usage": usage},
        workers={
            "pg@vm": WorkerReport(
                2,
                2,
                None,
                "celery.concurrency.prefork:TaskPool",
                ["dead_letter", "ingest.postgres"],
                7,
                9.0,
                3,
                role="pg",
            )
        },
    )

    lines = render_status(report).splitlines()
    assert lines[:3] == [
        "queue                waiting   unacked     total",
        "ingest.postgres            0         0         0",
        "ingest.sqlite             10         2        12",
    ]
    assert "dead letters pending: 8" in lines
    assert "  usage_events          sqlite    ValidationError                 8  0s ago" in lines
    assert "sources (3)" in lines
    assert "  source                  age   commit  backlog flight  last run" in lines
    assert (
        "  usage                 5h00m       2s    10000     10  ok 3s ago: 10 pages,"
        " 10000 records in 0.393s"
    ) in lines
    assert "  prices                3h00m        —        —      0  never ran" in lines
    bot_line = next(line for line in lines if line.startswith("  bot "))
    assert "failed 2m00s ago: 0 pages, 0 records in 1.5s; 2 failed in 24h — boom" in bot_line
    assert bot_line.endswith("; migration complete: 5 keys, 9 records, 1 dead letters, pages 3/3")
    assert "workers online: 1" in lines and "errors:" not in lines
    assert lines[lines.index("workers online: 1") + 2].split() == [
        "pg",
        "pg@vm",
        "prefork",
        "2",
        "dead_letter,ingest.postgres",
    ]
    # What is wrong is listed: the failed run, the dead letters, a queue nobody consumes.
    assert lines[lines.index("problems:") :] == [
        "problems:",
        "  source bot: last run failed",
        "  8 dead letters pending",
        "  no worker consumes ingest.sqlite (12 pages waiting)",
    ]

    doc = json.loads(json.dumps(report.as_dict()))  # plain JSON values only
    assert doc["ok"] is False  # bot's last run failed
    assert doc["dead_letters"]["pending"] == 8
    assert doc["queues"]["ingest.sqlite"] == {"waiting": 10, "unacked": 2, "total": 12}
    assert doc["sources"]["usage"]["unprocessed"] == 10_000
    assert doc["sources"]["usage"]["mode"] == "local"
    assert doc["sources"]["usage"]["newest_record"] == "2025-11-25T17:47:00+00:00"
    assert doc["sources"]["usage"]["backlog_age_seconds"] == 18_000
    assert doc["sources"]["usage"]["oldest_unprocessed"] == "2026-11-26T10:47:00+00:00"
    assert doc["roles"] == {"pg": ["pg@vm"]}
    assert doc["sources"]["prices"]["cursors"] == {"BTCUSDT": "2026-11-26T12:47:00+00:00"}
    assert "unprocessed" not in doc["sources"]["prices"] and "mode" not in doc["sources"]["prices"]
    assert "lag_seconds" not in doc["sources"]["bot"]  # a one-time migration has no lag
    assert doc["sources"]["bot"]["migration"]["pages_acked"] == 3
    assert doc["workers"]["pg@vm"]["autoscale"] is None

    # A part that could not be read is named, and makes the report not ok.
    unread = StatusReport(time=now, broker="amqp", state="sqlite", errors={"queues": "down\nmore"})
    text_ = render_status(unread)
    assert "queues: unavailable" in text_ and "dead letters pending: unavailable" in text_
    assert text_.endswith("problems:\n  cannot read queues\n\nerrors:\n  queues: down")
    assert not unread.ok and unread.as_dict()["queues"] is None

    # A store that cannot be reached: what lives there is unknown, said as such.
    cut = StatusReport(
        time=now,
        broker="redis",
        state="postgres",
        sources={
            "usage": SourceReport(
                "usage", "d1", "usage_events", runs_unknown="postgres unreachable"
            )
        },
        unreachable={"postgres": "refused", "redis": "refused"},
        errors={"postgres": "refused", "queues": "refused", "workers": "refused"},
    )
    shown = render_status(cut).splitlines()
    assert shown[0] == "queues: unknown: redis unreachable"
    assert "dead letters pending: unknown: postgres unreachable" in shown
    assert "workers: unknown: redis unreachable" in shown
    assert any(
        ln.startswith("  usage ") and ln.endswith("unknown: postgres unreachable") for ln in shown
    )
    assert cut.problems == ["postgres unreachable", "redis unreachable"]


def test_a_d1_source_reports_its_backlog_or_its_cursor(env: Env) -> None:
    """A mark-mode table counts its rows not processed yet; a watermark one, which marks
    nothing, shows its committed cursor instead."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 50)
    env.write_config(
        d1_config(d1) + f'\n[sources.tail]\nkind = "d1"\nstream = "usage_events"\npath = "{d1}"\n'
        'capture = "watermark"\n'
    )
    settings = Settings.load(env.vars)
    store = StateStore(postgres_engine(env.pg_url))
    try:
        mark = source_status(settings, "d1_usage", store)
        assert isinstance(mark, D1Status) and mark.errors == {}
        assert (mark.unprocessed, mark.cursor, mark.lag_from) == (50, None, "stream")
        assert "cursor" not in mark.facts()
        times = [
            datetime.fromisoformat(t)
            for (t,) in sqlite3.connect(d1).execute(
                "SELECT timestamp FROM usage_events ORDER BY rowid"
            )
        ]
        # Mark capture: the least event time of the rows not processed yet.
        assert mark.oldest_unprocessed == min(times) and not mark.caught_up

        tail = source_status(settings, "tail", store)
        assert isinstance(tail, D1Status) and tail.errors == {}
        assert (tail.unprocessed, tail.cursor) == (None, None)
        # Watermark capture, nothing committed yet: everything waits, from the first row.
        assert tail.oldest_unprocessed == times[0] and not tail.caught_up
        with store.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO source_progress (source, partition, cursor, updated_at)"
                    " VALUES ('tail', '', '[7,null]', now())"
                )
            )
        tail = source_status(settings, "tail", store)
        assert isinstance(tail, D1Status)
        assert tail.cursor == [7, None] and tail.facts()["cursor"] == [7, None]
        assert tail.facts()["unprocessed"] is None
        assert tail.oldest_unprocessed == times[7]  # the first row after the cursor (rowid 8)
        with store.write() as conn:
            conn.execute(text("UPDATE source_progress SET cursor = '[50,null]'"))
        tail = source_status(settings, "tail", store)
        assert isinstance(tail, D1Status) and tail.caught_up
        assert tail.backlog_age(datetime.now(UTC)) == 0
        # Without the state store, what lives there is unknown, not an error.
        unknown = source_status(settings, "tail", None)
        assert isinstance(unknown, D1Status) and unknown.cursor is None and not unknown.errors
    finally:
        store.dispose()

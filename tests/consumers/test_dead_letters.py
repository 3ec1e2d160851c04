"""The dead-letter workflow as an operator runs it: list, replay, a replay that fails again."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import psycopg2

from sluice.consumers.ingest import ingest
from sluice.ops.workers import WorkerPool
from sluice.shared.celery_app import app
from sluice.shared.database import libpq_dsn
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.page import Page
from sluice.shared.records import dedupe
from sluice.shared.settings import Settings
from sluice.shared.streams import USAGE_EVENTS
from tests.conftest import Env
from tests.helpers import pg_keys, pg_scalar, wait_queues_empty
from tests.ops.test_cli import sluice
from tests.shared.test_sinks import valid_rows


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def sql(env: Env, statement: str) -> None:
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    with conn, conn.cursor() as cur:
        cur.execute(statement)
    conn.close()


def test_poison_then_replay_brings_records_in_once(env: Env) -> None:
    env.write_config("")
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    sql(env, "ALTER TABLE usage_events ADD CONSTRAINT non_negative CHECK (metric_value >= 0)")
    rows = dedupe(USAGE_EVENTS, valid_rows(1_300))[:1_000]
    poison = [3, 400, 801]
    for i in poison:
        rows[i][5] = -5.0
    poison_keys = {rows[i][3] for i in poison}
    page = Page(
        uuid.uuid4().hex,
        "usage_events",
        "postgres",
        "test",
        "run-1",
        list(USAGE_EVENTS.column_names),
        rows,
    )
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 2)
        assert ingest.apply(args=[page.encode()]).get()["inserted"] == 997
        count = "SELECT count(*) FROM failed_ingestions WHERE status = 'pending'"
        wait_for(lambda: pg_scalar(env.pg_url, count) == 3)

        listed = json.loads(
            sluice("dlq", "list", "--json", "--stream", "usage_events", env=env.vars).stdout
        )
        assert {d["record_key"] for d in listed} == poison_keys
        assert all("non_negative" in d["error_message"] for d in listed)
        table = sluice("dlq", "list", "--error", "RejectedBySink", env=env.vars).stdout
        assert table.count("RejectedBySink") == 3
        dry = sluice("dlq", "replay", "--dry-run", env=env.vars).stdout
        assert "would replay 3 record(s) in 1 page(s)" in dry
        assert pg_scalar(env.pg_url, count) == 3  # a dry run changes nothing

        # Replayed before the data is fixed: they fail again, pending with the count raised.
        assert "replayed 3 record(s)" in sluice("dlq", "replay", env=env.vars).stdout
        again = (
            "SELECT count(*) FROM failed_ingestions WHERE status = 'pending'"
            " AND attempts = 2 AND replay_count = 1"
        )
        wait_for(lambda: pg_scalar(env.pg_url, again) == 3)

        # Fixed (the rule was wrong): replay brings them in, once.
        sql(env, "ALTER TABLE usage_events DROP CONSTRAINT non_negative")
        assert "replayed 3 record(s)" in sluice("dlq", "replay", env=env.vars).stdout
        wait_for(lambda: len(pg_keys(env.pg_url)) == 1_000)
        wait_queues_empty(ctx)
        # Replaying the already replayed ones changes nothing.
        out = sluice("dlq", "replay", "--status", "replayed", env=env.vars).stdout
        assert "replayed 3 record(s)" in out
        wait_queues_empty(ctx)
    keys = pg_keys(env.pg_url)
    assert len(keys) == 1_000 and max(keys.values()) == 1
    assert poison_keys <= set(keys)
    assert (
        pg_scalar(env.pg_url, "SELECT count(*) FROM failed_ingestions WHERE status = 'pending'")
        == 0
    )
    # Every letter at once only when asked for in so many words.
    refused = sluice("dlq", "discard", "--status", "all", env=env.vars)
    assert refused.returncode == 2 and "--all" in refused.stderr
    discarded = sluice("dlq", "discard", "--status", "all", "--all", env=env.vars).stdout
    assert "discarded 3 dead letter(s)" in discarded

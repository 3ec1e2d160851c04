"""Change capture from a D1 table Sluice may only read (watermark and snapshot modes), on the
report-snapshot table as its own service creates it: inserts, reports run again (INSERT OR
REPLACE, or an upsert in place) and deletions reach both sinks, whatever order the pages take."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.ops.reconcile import reconcile
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn
from sluice.shared.migrations import migrate_sqlite, split_statements
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import TASK_QUEUES, run_queued_tasks

DDL = Path(__file__).parents[1] / "fixtures" / "d1_tables" / "scheduled_job_results.sql"
COLUMNS = "scheduled_date, report_type, report_content, metadata, trigger_source, created_at"
# What the jobs service runs when a report is (re)generated: a new row, or a re-run replacing it.
REPLACE = (
    "INSERT OR REPLACE INTO scheduled_job_results (scheduled_date, report_type, report_content,"
    " metadata, trigger_source) VALUES (?, ?, ?, ?, ?)"
)
UPSERT = (
    "INSERT INTO scheduled_job_results (scheduled_date, report_type, report_content, metadata,"
    " trigger_source) VALUES (?, ?, ?, ?, ?) ON CONFLICT (scheduled_date, report_type)"
    " DO UPDATE SET report_content = excluded.report_content, metadata = excluded.metadata"
)

CAPTURES = {
    "watermark-rowid": 'capture = "watermark"\n',
    "watermark-created_at": 'capture = "watermark"\nwatermark_column = "created_at"\n',
    "snapshot": 'capture = "snapshot"\ndeletes = true\n',
}


def jobs_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    for statement in split_statements(DDL.read_text()):
        conn.execute(statement)
    conn.commit()
    conn.close()


def jobs(path: Path, sql: str, rows: list[tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(path)
    conn.executemany(sql, rows)
    conn.commit()
    conn.close()


def configure(env: Env, d1: Path, capture: str, batch: int = 50) -> Context:
    env.write_config(
        f"""
[sources.reports]
kind = "d1"
stream = "scheduled_job_results"
path = "{d1}"
batch_size = {batch}
max_batches = 100000
{capture}"""
    )
    migrate_sqlite(env.sqlite_path)
    return app.configure(Settings.load(env.vars))


def sync(ctx: Context, shuffle: random.Random | None = None) -> int:
    """One run of the source, and every page it made through both sinks (in `shuffle`'s order)."""
    summary = run_source(ctx, "reports")
    assert summary.status == "ok", summary.error
    run_queued_tasks(ctx, shuffle)
    assert ctx.progress.in_flight("reports") == 0
    return summary.records


def _normal(rows: list[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    out = set()
    for date, kind, content, metadata, trigger, created in rows:
        meta = json.dumps(json.loads(metadata) if isinstance(metadata, str) else metadata)
        when = datetime.fromisoformat(str(created).replace("Z", "+00:00")).replace(tzinfo=None)
        out.add((date, kind, content, meta if metadata is not None else None, trigger, when))
    return out


def held(env: Env, d1: Path) -> dict[str, set[tuple[Any, ...]]]:
    """The table's rows as the source holds them, and as each sink holds them."""
    query = f"SELECT {COLUMNS} FROM scheduled_job_results"
    src = sqlite3.connect(d1)
    lite = sqlite3.connect(env.sqlite_path)
    pg = psycopg2.connect(libpq_dsn(env.pg_url))
    try:
        with pg.cursor() as cur:
            cur.execute(query.replace("created_at", "created_at AT TIME ZONE 'UTC'"))
            in_pg = cur.fetchall()
        return {
            "source": _normal(src.execute(query).fetchall()),
            "sqlite": _normal(lite.execute(query).fetchall()),
            "postgres": _normal(in_pg),
        }
    finally:
        src.close()
        lite.close()
        pg.close()


def assert_same(env: Env, d1: Path) -> None:
    rows = held(env, d1)
    assert rows["sqlite"] == rows["source"]
    assert rows["postgres"] == rows["source"]


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.mark.parametrize("capture", list(CAPTURES))
def test_reports_and_their_reruns_reach_both_sinks_without_writing_the_table(
    env: Env, capture: str
) -> None:
    d1 = env.dir / "jobs.sqlite"
    jobs_db(d1)
    jobs(
        d1,
        REPLACE,
        [
            ("2026-12-01", "analysis", "first", '{"trigger":"cron"}', "cron"),
            ("2026-12-01", "briefing", "b", None, "cron"),
            ("2026-12-02", "analysis", "second", '{"x":[1,2]}', "manual-api"),
        ],
    )
    ctx = configure(env, d1, CAPTURES[capture])
    assert sync(ctx) == 3
    assert_same(env, d1)
    before = dump(d1)
    assert sync(ctx) == 0  # nothing changed: nothing sent
    assert dump(d1) == before  # read-only: the table is as it was

    # A report run again: the service replaces its row (a new id and a new created_at).
    jobs(d1, REPLACE, [("2026-12-01", "analysis", "first, again", '{"rerun":true}', "manual")])
    assert sync(ctx) >= 1
    assert_same(env, d1)
    doc = reconcile(ctx.settings, "reports", sample=10).as_dict()
    assert doc["ok"], doc
    assert doc["capture"] == capture.split("-")[0]


def test_snapshot_catches_upserts_in_place_and_deletions(env: Env) -> None:
    d1 = env.dir / "jobs.sqlite"
    jobs_db(d1)
    jobs(d1, REPLACE, [(f"2026-12-{d:02d}", "analysis", f"r{d}", None, "cron") for d in (1, 2, 3)])
    ctx = configure(env, d1, CAPTURES["snapshot"])
    assert sync(ctx) == 3
    jobs(d1, UPSERT, [("2026-12-02", "analysis", "rewritten in place", '{"v":2}', "x")])
    conn = sqlite3.connect(d1)
    conn.execute("DELETE FROM scheduled_job_results WHERE scheduled_date = '2026-12-03'")
    conn.commit()
    conn.close()
    assert sync(ctx) == 2  # one changed row, and one key in a deletion page
    assert_same(env, d1)


def test_a_watermark_deletion_is_kept_and_reconcile_says_so(env: Env) -> None:
    d1 = env.dir / "jobs.sqlite"
    jobs_db(d1)
    jobs(d1, REPLACE, [(f"2026-12-{d:02d}", "analysis", f"r{d}", None, "cron") for d in (1, 2)])
    ctx = configure(env, d1, CAPTURES["watermark-rowid"])
    sync(ctx)
    conn = sqlite3.connect(d1)
    conn.execute("DELETE FROM scheduled_job_results WHERE scheduled_date = '2026-12-02'")
    conn.commit()
    conn.close()
    doc = reconcile(ctx.settings, "reports", sample=10).as_dict()
    assert doc["ok"]
    gone = doc["streams"]["scheduled_job_results"]["sinks"]["postgres"]["deleted_at_source"]
    assert gone["total"] == 1


def test_snapshot_of_a_large_table_sends_only_what_changed(env: Env) -> None:
    d1 = env.dir / "jobs.sqlite"
    jobs_db(d1)
    n = 100_000
    jobs(d1, REPLACE, [(f"d{i:06d}", "analysis", f"report {i}", None, "cron") for i in range(n)])
    ctx = configure(env, d1, CAPTURES["snapshot"], batch=1000)
    assert sync(ctx) == n
    changed = random.Random(7).sample(range(n), n // 100)
    jobs(d1, UPSERT, [(f"d{i:06d}", "analysis", f"report {i} v2", None, "cron") for i in changed])
    assert sync(ctx) == n // 100
    rows = held(env, d1)
    assert rows["postgres"] == rows["source"] == rows["sqlite"]


# -- properties: any sequence of changes, pages in any order -----------------------------------

DATES = [f"2026-12-{d:02d}" for d in range(1, 5)]
TYPES = ["analysis", "briefing", "intraday"]


# Any text a sink can hold (a NUL or an unpaired surrogate is a dead letter instead: see
# tests/pipeline/test_fidelity.py).
STORABLE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def change(kinds: list[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.sampled_from(kinds),
        st.sampled_from(DATES),
        st.sampled_from(TYPES),
        st.text(STORABLE, max_size=30),
        st.one_of(
            st.none(),
            st.dictionaries(st.text(STORABLE, max_size=5), st.integers(), max_size=2),
        ),
    )


def apply_changes(d1: Path, batch: list[tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(d1)
    for kind, date, report, content, meta in batch:
        params = (date, report, content, None if meta is None else json.dumps(meta), "prop")
        if kind == "replace":
            conn.execute(REPLACE, params)
        elif kind == "upsert":
            conn.execute(UPSERT, params)
        else:
            conn.execute(
                "DELETE FROM scheduled_job_results WHERE scheduled_date = ? AND report_type = ?",
                (date, report),
            )
    conn.commit()
    conn.close()


Runs = list[tuple[list[tuple[Any, ...]], bool]]


def _property(env: Env, capture: str, runs: Runs, seed: int) -> None:
    d1 = env.dir / f"jobs-{random.random()}.sqlite"
    jobs_db(d1)
    ctx = configure(env, d1, CAPTURES[capture], batch=3)
    # Each example starts from empty sinks, queues and progress (they outlive examples).
    for key in [*ctx.redis.scan_iter("sluice:*"), *TASK_QUEUES]:
        ctx.redis.delete(key)
    lite = sqlite3.connect(env.sqlite_path)
    lite.execute("DELETE FROM scheduled_job_results")
    lite.commit()
    lite.close()
    pg = psycopg2.connect(libpq_dsn(env.pg_url))
    with pg, pg.cursor() as cur:
        cur.execute(
            "DELETE FROM scheduled_job_results; DELETE FROM source_progress;"
            " DELETE FROM source_snapshots"
        )
    pg.close()
    shuffle = random.Random(seed)
    for batch, drain_now in runs:
        apply_changes(d1, batch)
        summary = run_source(ctx, "reports")
        assert summary.status == "ok", summary.error
        if drain_now:  # else the next run reads while these pages are still on their way
            run_queued_tasks(ctx, shuffle)
            sync(ctx, shuffle)  # a snapshot run skips while pages are in flight: catch up
            assert_same(env, d1)
    run_queued_tasks(ctx, shuffle)
    sync(ctx, shuffle)  # what a run made while pages were in flight skipped
    assert_same(env, d1)


def property_settings(f: Callable[..., Any]) -> Callable[..., Any]:
    return settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )(f)


@property_settings
@given(
    runs=st.lists(
        st.tuples(st.lists(change(["replace"]), max_size=8), st.booleans()), min_size=1, max_size=4
    ),
    seed=st.integers(0, 1000),
)
def test_watermark_keeps_both_sinks_equal_to_the_table(env: Env, runs: Runs, seed: int) -> None:
    """Inserts and INSERT OR REPLACE (the service's re-runs), pages in any order."""
    _property(env, "watermark-rowid", runs, seed)


@property_settings
@given(
    runs=st.lists(
        st.tuples(st.lists(change(["replace", "upsert", "delete"]), max_size=8), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 1000),
)
def test_snapshot_keeps_both_sinks_equal_to_the_table(env: Env, runs: Runs, seed: int) -> None:
    """Inserts, updates in place and deletions, pages in any order."""
    _property(env, "snapshot", runs, seed)

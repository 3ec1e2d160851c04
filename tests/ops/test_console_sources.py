"""Steering sources as an operator does, through `sluice source` and `sluice runs` against real
workers: pause and resume, run now and follow the run by its id, reset an HTTP source's cursors
(confirmed), start a backfill on the workers and watch it to the end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import text

from sluice.ops import runs, sources
from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.cursors import CursorStore, format_cursor
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket
from tests.helpers import d1_config, pg_scalar
from tests.ops.test_cli import sluice
from tests.producers.test_http_sources import config as http_config

ALL_QUEUES = ["produce", "ingest.postgres", "dead_letter", "progress"]


def wait_run(
    env: Env, run_id: str, done: tuple[str, ...], timeout: float = 90
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        r = sluice("runs", "show", run_id, "--json", env=env.vars)
        assert r.returncode == 0, r.stderr
        doc: dict[str, Any] = json.loads(r.stdout)
        run = doc["run"]
        assert isinstance(run, dict)
        if run["status"] in done:
            return doc
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}"
        time.sleep(0.3)


def test_pause_run_now_and_follow_the_run(env: Env, workers: WorkerPool) -> None:
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 300)
    env.write_config(d1_config(d1, page_size=100))
    migrate_sqlite(env.sqlite_path)
    r = sluice("source", "pause", "d1_usage", "--reason", "schema change", env=env.vars)
    assert r.returncode == 0 and "paused (schema change)" in r.stdout
    skipped = sluice("produce", "d1_usage", "--json", env=env.vars)
    doc = json.loads(skipped.stdout)
    assert doc["status"] == "skipped" and "schema change" in doc["error"]
    refused = sluice("source", "run", "d1_usage", env=env.vars)
    assert refused.returncode == 2 and "paused" in refused.stderr and "resume" in refused.stderr
    assert sluice("source", "resume", "d1_usage", env=env.vars).returncode == 0

    workers.start("all", ALL_QUEUES, 2)
    workers.start_sqlite_writer()
    started = sluice("source", "run", "d1_usage", "--json", env=env.vars)
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    done = wait_run(env, run_id, ("ok", "failed", "partial", "skipped"))
    run = done["run"]
    assert isinstance(run, dict)
    assert run["status"] == "ok" and run["kind"] == "produce" and run["pages"] == 3
    assert run["records"] == 300
    # The pages the workers committed are the run's, in this store.
    deadline = time.monotonic() + 60
    while pg_scalar(env.pg_url, "SELECT count(*) FROM usage_events") != len(
        sample.distinct_valid_keys
    ):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    pages = wait_run(env, run_id, ("ok",))["pages"]
    assert isinstance(pages, list) and {p["sink"] for p in pages} == {"postgres"}
    assert sum(p["received"] for p in pages) == 300
    listed = sluice("runs", "list", "--source", "d1_usage", "--json", env=env.vars)
    ids = [r["run_id"] for r in json.loads(listed.stdout)]
    assert ids[0] == run_id and len(ids) == 2  # the run, and the paused one skipped before
    table = sluice("runs", "list", "--limit", "1", env=env.vars)
    assert run_id in table.stdout and "--before" in table.stderr


def test_reset_cursor_is_confirmed_and_only_for_http_sources(env: Env) -> None:
    env.write_config(
        http_config("http://127.0.0.1:9", start="2024-01-01T00:00:00Z")
        + f'\n[sources.usage]\nkind = "d1"\nstream = "usage_events"\npath = "{env.dir}/d1.sqlite"\n'
    )
    ctx = app.configure(Settings.load(env.vars))
    cursors = CursorStore(ctx.state)
    cursors.set("bn", "BTCUSDT", sources.parse_time("2024-03-01"))
    declined = subprocess.run(
        [sys.executable, "-m", "sluice.ops.cli", "source", "reset", "bn", "--to", "2024-01-05"],
        env=env.vars,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert declined.returncode == 1 and "no cursor changed" in declined.stderr
    assert "reset every cursor of bn" in declined.stderr
    assert format_cursor(cursors.get_all("bn")["BTCUSDT"]) == "2024-03-01T00:00:00Z"
    ok = sluice("source", "reset", "bn", "--to", "2024-01-05", "--yes", "--json", env=env.vars)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["before"] == {"BTCUSDT": "2024-03-01T00:00:00Z", "ETHUSDT": None}
    assert {p: format_cursor(c) for p, c in cursors.get_all("bn").items()} == {
        "BTCUSDT": "2024-01-05T00:00:00Z",
        "ETHUSDT": "2024-01-05T00:00:00Z",
    }
    d1 = sluice("source", "reset", "usage", "--to", "2024-01-05", "--yes", env=env.vars)
    assert d1.returncode == 2 and "no time cursor" in d1.stderr
    unknown = sluice("source", "pause", "nope", env=env.vars)
    assert unknown.returncode == 2 and "unknown source 'nope'" in unknown.stderr
    assert "Traceback" not in d1.stderr + unknown.stderr


def test_backfill_runs_on_the_workers_and_reports_progress(env: Env, workers: WorkerPool) -> None:
    with FakeMarket() as fake:
        env.write_config(http_config(fake.base_url, start="2024-06-01T00:00:00Z"))
        migrate_sqlite(env.sqlite_path)
        workers.start("all", ALL_QUEUES, 2)
        workers.start_sqlite_writer()
        args = ["source", "backfill", "bn", "--from", "2024-01-01", "--to", "2024-01-02"]
        r = sluice(*args, "--follow", "--json", env=env.vars, timeout=180)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["status"] == "complete"
        assert (doc["windows_done"], doc["windows_total"]) == (2, 2)
        assert doc["records"] == 48  # 24 hours of two symbols
        assert "complete: 2/2 window(s)" in r.stderr
        bad = sluice(
            "source", "backfill", "bn", "--from", "2024-01-02", "--to", "2024-01-01", env=env.vars
        )
        assert bad.returncode == 2 and "after its start" in bad.stderr
    ctx = app.configure(Settings.load(env.vars))
    (run,) = runs.list_runs(ctx.state, runs.RunFilters(kind="backfill")).rows
    assert run["run_id"] == doc["run_id"] and run["source"] == "bn"
    deadline = time.monotonic() + 60
    while not runs.show_run(ctx.state, doc["run_id"]).pages:
        assert time.monotonic() < deadline, "the backfill's pages were never committed"
        time.sleep(0.3)
    # Its live cursors never moved: the backfill keeps its own progress.
    assert CursorStore(ctx.state).get_all("bn") == {}


def test_a_new_run_closes_a_dead_run_but_not_a_running_backfill(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(d1_config(d1, page_size=100))
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    with ctx.state.write() as conn:
        for run_id, kind in (("dead-run", "produce"), ("live-backfill", "backfill")):
            conn.execute(
                text(
                    "INSERT INTO source_runs (run_id, source, stream, kind, started_at, status)"
                    " VALUES (:r, 'd1_usage', 'usage_events', :k, :t, 'running')"
                ),
                {"r": run_id, "k": kind, "t": ctx.state.now()},
            )
    assert run_source(ctx, "d1_usage").status == "ok"
    status = {r["run_id"]: r["status"] for r in runs.list_runs(ctx.state, runs.RunFilters()).rows}
    assert status["dead-run"] == "died"
    assert status["live-backfill"] == "running"

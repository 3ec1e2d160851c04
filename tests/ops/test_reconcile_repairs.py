"""`sluice reconcile` after dead letters are repaired, with real worker processes: a row fixed at
the source and re-fetched, a replay once the sink takes the record again, and a record edited
by hand while its source row stays invalid (reported apart, as the operator's choice, not as
an unexplained extra row)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config, drain
from tests.ops.test_cli import sluice
from tests.ops.test_console_repairs import in_sinks, letters_of
from tests.ops.test_reconcile import lite_exec, pg_exec, reconcile_json

pytestmark = pytest.mark.timeout(600)


def source_rows(d1: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(d1)
    try:
        return [r[0] for r in conn.execute(sql, params)]
    finally:
        conn.close()


@pytest.fixture
def pipeline(env: Env) -> Iterator[tuple[Context, Path, WorkerPool]]:
    """A D1 file of 60 usage events run through real workers into PostgreSQL and SQLite."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 60)
    env.write_config(d1_config(d1, page_size=100))
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 1)
        pool.start_sqlite_writer()
        yield ctx, d1, pool


def valid_keys(d1: Path, n: int) -> list[str]:
    return source_rows(
        d1,
        "SELECT idempotency_key FROM usage_events WHERE typeof(metric_value) IN ('integer','real')"
        " AND metric_value >= 0 AND organisation_id != '' ORDER BY id LIMIT ?",
        (n,),
    )


def spoil(d1: Path, keys: list[str]) -> None:
    for key in keys:
        lite_exec(
            d1, "UPDATE usage_events SET metric_value = 'oops' WHERE idempotency_key = ?", (key,)
        )


def wait_for(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def run_in(ctx: Context, keys: list[str], sinks: int = 2) -> None:
    """Drain the source, then wait until each key's dead letters are stored."""
    drain(ctx, "d1_usage", timeout=120)
    for key in keys:
        wait_for(f"letters of {key}", lambda k=key: len(letters_of(ctx, k)) == sinks)


def clean(env: Env, *extra: str) -> dict[str, Any]:
    code, doc = reconcile_json(env, "d1_usage", "--sample", "100000", *extra)
    assert code == 0 and doc["ok"], json.dumps(doc)[:3000]
    return doc["streams"]["usage_events"]


def test_refetched_rows_reconcile_clean(
    env: Env, pipeline: tuple[Context, Path, WorkerPool]
) -> None:
    ctx, d1, _ = pipeline
    keys = valid_keys(d1, 2)
    spoil(d1, keys)
    run_in(ctx, keys)
    s = clean(env)
    assert s["dead_letters"]["postgres"] >= 2
    # Fixed at the source, not yet re-fetched: pending letters explain the sinks lacking them.
    for key in keys:
        lite_exec(
            d1, "UPDATE usage_events SET metric_value = 2.5 WHERE idempotency_key = ?", (key,)
        )
    s = clean(env)
    for sink in ("postgres", "sqlite"):
        assert sorted(k[0] for k in s["sinks"][sink]["dead_lettered"]["keys"]) == sorted(keys)
    ids = [str(x["id"]) for k in keys for x in letters_of(ctx, k)]
    r = sluice("dlq", "refetch", *ids, env=env.vars)
    assert r.returncode == 0, r.stderr
    for key in keys:
        wait_for(f"{key} in both sinks", lambda k=key: in_sinks(env, k) == ([2.5], [2.5]))
    s = clean(env)
    for sink in ("postgres", "sqlite"):
        d = s["sinks"][sink]
        assert d["missing"]["total"] == d["dead_lettered"]["total"] == d["extra"]["total"] == 0
        assert d["sample"]["differ"] == 0 and d["sample"]["checked"] == s["source"]["keys"]
        assert d["repaired_by_edit"]["total"] == 0
    table = sluice("reconcile", "d1_usage", env=env.vars)
    assert table.returncode == 0 and "reconcile d1_usage (d1, mark capture): OK" in table.stdout


def test_replay_once_the_sink_takes_the_record_reconciles_clean(
    env: Env, pipeline: tuple[Context, Path, WorkerPool]
) -> None:
    ctx, d1, _ = pipeline
    (key,) = valid_keys(d1, 1)
    # PostgreSQL refuses the record (a constraint an operator added, then dropped); SQLite takes it.
    pg_exec(
        env.pg_url,
        f"ALTER TABLE usage_events ADD CONSTRAINT refuse_one CHECK (idempotency_key <> '{key}')",
    )
    run_in(ctx, [key], sinks=1)
    (letter,) = letters_of(ctx, key)
    assert letter["sink"] == "postgres"
    s = clean(env)
    assert s["sinks"]["postgres"]["dead_lettered"] == {"total": 1, "keys": [[key]]}
    pg_exec(env.pg_url, "ALTER TABLE usage_events DROP CONSTRAINT refuse_one")
    r = sluice("dlq", "replay", str(letter["id"]), env=env.vars)
    assert r.returncode == 0, r.stderr
    wait_for("the replayed record", lambda: len(in_sinks(env, key)[0]) == 1)
    s = clean(env)
    d = s["sinks"]["postgres"]
    assert d["missing"]["total"] == d["dead_lettered"]["total"] == d["extra"]["total"] == 0
    assert d["sample"]["differ"] == 0 and d["repaired_by_edit"]["total"] == 0


def test_an_edit_over_an_invalid_source_row_is_reported_apart(
    env: Env, pipeline: tuple[Context, Path, WorkerPool]
) -> None:
    ctx, d1, _ = pipeline
    keys = valid_keys(d1, 2)
    spoil(d1, keys)
    run_in(ctx, keys)
    edited, fixed = keys
    # One key stays invalid at the source and is edited by hand; the other is fixed at the
    # source (2.5) and edited to another value (7.25): the operator's record wins in the sinks.
    lite_exec(d1, "UPDATE usage_events SET metric_value = 2.5 WHERE idempotency_key = ?", (fixed,))
    letter_of: dict[tuple[str, str], int] = {}
    for key in keys:
        for x in letters_of(ctx, key):
            letter_of[(key, x["sink"])] = x["id"]
            r = sluice("dlq", "edit", str(x["id"]), "--set", "metric_value=7.25", env=env.vars)
            assert r.returncode == 0, r.stderr
    for key in keys:
        wait_for(f"{key} edited", lambda k=key: in_sinks(env, k) == ([7.25], [7.25]))
    s = clean(env)
    for sink in ("postgres", "sqlite"):
        d = s["sinks"][sink]
        assert d["extra"]["total"] == d["missing"]["total"] == d["sample"]["differ"] == 0, sink
        assert d["ok"] is True
        rep = d["repaired_by_edit"]
        assert rep["total"] == 2
        assert sorted(rep["keys"]) == sorted([[edited], [fixed]]), rep
        assert sorted(rep["letters"]) == sorted(letter_of[(k, sink)] for k in keys)
    table = sluice("reconcile", "d1_usage", env=env.vars)
    assert table.returncode == 0, table.stderr
    assert "OK" in table.stdout.splitlines()[0]
    assert "repaired by edit, differs from the source: usage_events in sqlite (2)" in table.stdout
    assert f"letter {letter_of[(edited, 'sqlite')]}" in table.stdout

    # The sink's row must be the edited record: a row changed after the edit is a mismatch.
    lite_exec(
        env.sqlite_path,
        "UPDATE usage_events SET metric_value = 9 WHERE idempotency_key = ?",
        (edited,),
    )
    pg_exec(
        env.pg_url,
        "UPDATE usage_events SET metric_value = 9 WHERE idempotency_key = %s",
        (fixed,),
    )
    code, doc = reconcile_json(env, "d1_usage", "--sample", "100000")
    assert code == 1
    d = doc["streams"]["usage_events"]["sinks"]
    assert d["sqlite"]["extra"] == {"total": 1, "keys": [[edited]]}
    assert d["sqlite"]["repaired_by_edit"]["keys"] == [[fixed]]
    assert [(x["key"], x["column"]) for x in d["postgres"]["sample"]["differences"]] == [
        ([fixed], "metric_value")
    ]
    assert d["postgres"]["repaired_by_edit"]["keys"] == [[edited]]

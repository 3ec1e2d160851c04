"""Repairing dead letters that a replay cannot: re-fetching the record from its source by key
(a D1 row fixed at the source, a KV value fixed in the namespace) and editing the record by
hand, checked against its stream before anything is queued. On both state stores; the records
go through the real queue to both sinks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sluice.ops import dlq, runs
from sluice.ops.sample import write_d1_file
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.letters import DeadLetter, record_of_row, write_letters
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config, pg_rows, run_queued_tasks
from tests.ops.test_cli import sluice
from tests.producers.test_http_sources import config as http_config
from tests.producers.test_kv_source import bot_data


def d1_usage(env: Env, state: str) -> tuple[Context, Path, list[str]]:
    """A D1 file of 40 rows, three of them made invalid (metric_value 'oops'), run through the
    pipeline in this process; the three keys."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 40)
    conn = sqlite3.connect(d1)
    with conn:
        keys = [
            r[0]
            for r in conn.execute(
                "SELECT idempotency_key FROM usage_events WHERE metric_value >= 0"
                " AND organisation_id != '' ORDER BY id LIMIT 3"
            )
        ]
        conn.executemany(
            "UPDATE usage_events SET metric_value = 'oops' WHERE idempotency_key = ?",
            [(k,) for k in keys],
        )
    conn.close()
    env.write_config(
        d1_config(d1, page_size=100).replace("[pipeline]\n", f'[pipeline]\nstate = "{state}"\n')
    )
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    assert ctx.state.name == state
    assert run_source(ctx, "d1_usage").status == "ok"
    run_queued_tasks(ctx)
    return ctx, d1, keys


def letters_of(ctx: Context, key: str, status: str | None = "pending") -> list[dict[str, Any]]:
    return dlq.page_letters(ctx.state, dlq.Filters(text=key, status=status), 100).rows


def in_sinks(env: Env, key: str) -> tuple[list[Any], list[Any]]:
    pg = [
        r[0]
        for r in pg_rows(
            env.pg_url,
            f"SELECT metric_value FROM usage_events WHERE idempotency_key = '{key}'",
        )
    ]
    conn = sqlite3.connect(env.sqlite_path)
    lite = [
        r[0]
        for r in conn.execute(
            "SELECT metric_value FROM usage_events WHERE idempotency_key = ?", (key,)
        )
    ]
    conn.close()
    return pg, lite


@pytest.mark.parametrize("state", ["postgres", "sqlite"])
def test_refetch_reads_the_fixed_row_and_names_the_gone_one(env: Env, state: str) -> None:
    ctx, d1, (fixed, gone, still_bad) = d1_usage(env, state)
    for key in (fixed, gone, still_bad):
        assert {x["sink"] for x in letters_of(ctx, key)} == {"postgres", "sqlite"}
        assert in_sinks(env, key) == ([], [])
    conn = sqlite3.connect(d1)
    with conn:
        conn.execute(
            "UPDATE usage_events SET metric_value = 2.5 WHERE idempotency_key = ?",
            (fixed,),
        )
        conn.execute("DELETE FROM usage_events WHERE idempotency_key = ?", (gone,))
    conn.close()
    ids = [x["id"] for k in (fixed, gone, still_bad) for x in letters_of(ctx, k)]
    # Replaying the stored record cannot help: it is still 'oops'. Re-fetching can.
    result = dlq.refetch(ctx, ids)
    fixed_ids = sorted(x["id"] for x in letters_of(ctx, fixed, status="replayed"))
    assert sorted(result.refetched) == fixed_ids and len(fixed_ids) == 2
    assert {(m["key"], m["source"]) for m in result.missing} == {(gone, "d1_usage")}
    assert len(result.missing) == 2
    assert {m["key"] for m in result.invalid} == {still_bad}
    assert all("metric_value" in m["error"] for m in result.invalid)
    run_queued_tasks(ctx)
    assert in_sinks(env, fixed) == ([2.5], [2.5])
    assert in_sinks(env, gone) == ([], []) and in_sinks(env, still_bad) == ([], [])
    # The gone and still-invalid letters wait, pending; nothing was invented for them.
    assert len(letters_of(ctx, gone)) == 2 and len(letters_of(ctx, still_bad)) == 2
    # The letter keeps the record as it failed beside the one queued in its place.
    shown = dlq.show_letter(ctx.state, fixed_ids[0])
    assert (
        dict(zip(shown["record"]["columns"], shown["record"]["row"], strict=True))["metric_value"]
        == "oops"
    )
    assert shown["fixed_how"] == "refetch" and shown["fixed_at"] is not None
    queued = dict(zip(shown["fixed_record"]["columns"], shown["fixed_record"]["row"], strict=True))
    assert queued["metric_value"] == 2.5 and queued["idempotency_key"] == fixed
    # The run that read them shows its pages and their dead letters.
    run_id = runs.list_runs(ctx.state, runs.RunFilters(source="d1_usage")).rows[0]["run_id"]
    detail = runs.show_run(ctx.state, run_id)
    assert detail.pages and all(p["received"] for p in detail.pages)
    assert {x["record_key"] for x in detail.letters} >= {fixed, gone, still_bad}


@pytest.mark.parametrize("state", ["postgres", "sqlite"])
def test_edit_is_validated_before_it_is_queued(env: Env, state: str) -> None:
    ctx, _, (key, _, _) = d1_usage(env, state)
    lite = next(x for x in letters_of(ctx, key) if x["sink"] == "sqlite")
    before = dlq.show_letter(ctx.state, lite["id"])
    record = dlq.record_values(before)
    with pytest.raises(dlq.InvalidEditError, match="metric_value"):
        dlq.edit(ctx, lite["id"], {**record, "metric_value": "still oops"})
    with pytest.raises(dlq.InvalidEditError, match="no column 'nope'"):
        dlq.edit(ctx, lite["id"], {**record, "nope": 1})
    # Refused: nothing queued, the letter untouched.
    assert ctx.redis.llen("ingest.sqlite") == 0
    assert dlq.show_letter(ctx.state, lite["id"]) == before
    # The CLI: --set starts from the stored record.
    r = sluice("dlq", "edit", str(lite["id"]), "--set", "metric_value=abc", env=env.vars)
    assert r.returncode == 2 and "metric_value" in r.stderr and "Traceback" not in r.stderr
    r = sluice("dlq", "edit", str(lite["id"]), "--set", "metric_value=7.25", env=env.vars)
    assert r.returncode == 0, r.stderr
    run_queued_tasks(ctx)
    # Only the edited letter's sink got it; the postgres letter still waits.
    assert in_sinks(env, key) == ([], [7.25])
    after = dlq.show_letter(ctx.state, lite["id"])
    assert after["status"] == "replayed" and after["fixed_how"] == "edit"
    assert after["record"] == before["record"]  # the original, kept for the audit
    assert (
        dict(
            zip(
                after["fixed_record"]["columns"],
                after["fixed_record"]["row"],
                strict=True,
            )
        )["metric_value"]
        == 7.25
    )
    assert len(letters_of(ctx, key)) == 1


def test_refetch_from_kv_fixes_an_unmappable_value(env: Env) -> None:
    export = env.dir / "kv.json"
    data: dict[str, Any] = bot_data(3)
    entries = [{"key": k, "value": json.dumps(v)} for k, v in data.items()]
    broken = next(e for e in entries if e["key"] == "watchlist:1001")
    broken["value"] = "not json {"
    export.write_text(json.dumps(entries))
    env.write_config(f'[sources.bot]\nkind = "kv"\nmode = "local"\npath = "{export}"\n')
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    assert run_source(ctx, "bot").status == "ok"
    run_queued_tasks(ctx)
    (letter,) = letters_of(ctx, "watchlist:1001")
    assert letter["sink"] == "source" and letter["error_class"] == "KvMappingError"
    # A page of nothing but letters wrote no page to a sink: its letters name their run.
    (run,) = runs.list_runs(ctx.state, runs.RunFilters(source="bot")).rows
    assert [x["id"] for x in runs.show_run(ctx.state, run["run_id"]).letters] == [letter["id"]]
    watchlist = "SELECT ticker FROM watchlists WHERE chat_id = '1001' ORDER BY ticker"
    assert pg_rows(env.pg_url, watchlist) == []
    broken["value"] = json.dumps(["SPY", "TSLA"])
    export.write_text(json.dumps(entries))
    result = dlq.refetch(ctx, [letter["id"]])
    assert result.refetched == [letter["id"]] and result.records == 2
    assert result.pages == 2  # one page per sink of the stream
    run_queued_tasks(ctx)
    assert pg_rows(env.pg_url, watchlist) == [("SPY",), ("TSLA",)]
    conn = sqlite3.connect(env.sqlite_path)
    lite = conn.execute(watchlist).fetchall()
    conn.close()
    assert lite == [("SPY",), ("TSLA",)]


def test_refetch_refuses_http_sources_and_unknown_ids(env: Env) -> None:
    env.write_config(http_config("http://127.0.0.1:9", start="2024-01-01T00:00:00Z"))
    ctx = app.configure(Settings.load(env.vars))
    write_letters(
        ctx.state,
        [
            DeadLetter(
                "historical_prices",
                "postgres",
                "bn",
                "p1",
                "BTCUSDT|2024",
                record_of_row(["a"], [1]),
                "ValidationError",
                "bad",
            )
        ],
    )
    (letter,) = dlq.page_letters(ctx.state, dlq.Filters()).rows
    with pytest.raises(dlq.RefetchError, match="cannot be read by key"):
        dlq.refetch(ctx, [letter["id"]])
    with pytest.raises(dlq.UnknownLettersError, match="999999"):
        dlq.refetch(ctx, [999999])
    r = sluice("dlq", "refetch", str(letter["id"]), env=env.vars)
    assert r.returncode == 2 and "sluice backfill bn" in r.stderr
    assert letters_of(ctx, "BTCUSDT")[0]["status"] == "pending"

"""The D1 source: local files, wrangler's layout, and the REST API through a fake D1."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.d1_source import D1Source
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.wrangler import D1_OBJECT, d1_path, object_filename
from tests.conftest import Env
from tests.fakes.d1_server import FakeD1
from tests.helpers import d1_config, d1_processed, drain, pg_keys, sqlite_keys

DB_ID = "11111111-2222-3333-4444-555555555555"


def test_miniflare_file_name_matches_wrangler() -> None:
    # The file name miniflare itself produced for this id, copied from a wrangler state folder.
    assert object_filename(DB_ID, D1_OBJECT) == (
        "f023adf8de81e80d62670e09f086149af129cccda34c51f26517069258c53e8c.sqlite"
    )


def _settings(env: Env, body: str) -> Settings:
    env.write_config(body)
    return Settings.load(env.vars)


def test_local_pages_in_arrival_order_with_batch_limits(env: Env) -> None:
    """With the shipped schema (an index on processed_at alone) pages follow the rowid."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 2_500)
    settings = _settings(env, d1_config(d1, page_size=1000, max_batches=2))
    source = open_source(settings, "d1_usage")
    assert isinstance(source, D1Source) and source.order == "rowid"
    pages = list(source.pages(None, 2))
    assert [len(p.rows) for p in pages] == [1000, 1000]  # max_batches stops the run
    rowids = [r for p in pages for r in p.ack["rowid"]]
    assert rowids == sorted(rowids) and len(set(rowids)) == 2000
    by_rowid = _rows_by_rowid(d1)
    for page in pages:  # column order = stream order (id first); ack keys are the rows' ids
        assert [r[0] for r in page.rows] == page.ack["key"]
        assert [by_rowid[r] for r in page.ack["rowid"]] == page.ack["key"]
    assert pages[-1].last_key == ["rowid", rowids[-1]]
    rest = list(source.pages(pages[-1].last_key, 10))
    assert [len(p.rows) for p in rest] == [500]
    assert rest[0].ack["rowid"][0] > rowids[-1]

    source.acknowledge(pages[0].ack)
    source.acknowledge(pages[0].ack)  # twice is harmless
    assert d1_processed(d1) == (2_500, 1_000)
    again = [k for p in source.pages(None, 10) for k in p.ack["key"]]
    assert len(again) == 1_500 and not set(again) & set(pages[0].ack["key"])
    source.close()


def test_rowid_marks_only_the_rows_read(env: Env) -> None:
    """Rowids renumbered between read and acknowledgement (what a VACUUM may do): the rows that
    moved away stay unprocessed, the rows that moved in are not marked."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 300)
    source = open_source(_settings(env, d1_config(d1, page_size=100)), "d1_usage")
    page = next(iter(source.pages(None, 1)))
    moved_away = page.ack["rowid"][:10]
    conn = sqlite3.connect(d1, isolation_level=None)
    later = [r for (r,) in conn.execute("SELECT rowid FROM usage_events ORDER BY rowid DESC")][:10]
    for old, other in zip(moved_away, later, strict=True):
        conn.execute("UPDATE usage_events SET rowid = ? WHERE rowid = ?", (old + 10_000, old))
        conn.execute("UPDATE usage_events SET rowid = ? WHERE rowid = ?", (old, other))
    source.acknowledge(page.ack)
    marked = {
        k for (k,) in conn.execute("SELECT id FROM usage_events WHERE processed_at IS NOT NULL")
    }
    conn.close()
    assert marked == set(page.ack["key"][10:])
    source.close()


def _without_processed_index(d1: Path, index: str | None) -> None:
    conn = sqlite3.connect(d1, isolation_level=None)
    conn.execute("DROP INDEX idx_usage_events_unprocessed")
    if index:
        conn.execute(index)
    conn.close()


@pytest.mark.parametrize(
    ("index", "order"),
    [
        ("CREATE INDEX u ON usage_events (processed_at, id)", "key"),  # rowid order would sort
        (None, "rowid"),  # no index: a rowid range of the table itself
    ],
)
def test_auto_order_follows_the_indexes(env: Env, index: str | None, order: str) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 1_200)
    _without_processed_index(d1, index)
    source = open_source(_settings(env, d1_config(d1, page_size=500)), "d1_usage")
    assert isinstance(source, D1Source) and source.order == order
    pages = list(source.pages(None, 10))
    keys = [k for p in pages for k in (p.ack["key"] if order == "rowid" else p.ack)]
    assert len(set(keys)) == 1_200
    if order == "key":
        assert keys == sorted(keys) and pages[0].last_key == keys[499]
    for p in pages:
        source.acknowledge(p.ack)
    assert d1_processed(d1) == (1_200, 1_200)
    source.close()


def test_without_rowid_table_reads_in_key_order(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    _usage_table(d1, "id TEXT PRIMARY KEY", "WITHOUT ROWID", [f"e{i:04d}" for i in range(250)])
    source = open_source(_settings(env, d1_config(d1, page_size=100)), "d1_usage")
    assert isinstance(source, D1Source) and source.order == "key"
    pages = list(source.pages(None, 10))
    assert [len(p.rows) for p in pages] == [100, 100, 50] and pages[1].ack[0] == "e0100"
    source.acknowledge(pages[0].ack)
    assert d1_processed(d1) == (250, 100)
    source.close()


def test_a_resume_point_of_the_other_order_starts_over(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 300)
    source = open_source(_settings(env, d1_config(d1, page_size=100)), "d1_usage")
    assert sum(len(p.rows) for p in source.pages("ffffffff-an-old-id", 10)) == 300
    first = next(iter(source.pages(None, 1)))
    assert [len(p.rows) for p in source.pages(first.last_key, 10)] == [100, 100]
    source.close()


def test_integer_keys_in_key_order_resume_after_the_last_key(env: Env) -> None:
    """An integer key is a key, not a rowid resume point (those are tagged ["rowid", n])."""
    d1 = env.dir / "d1.sqlite"
    _usage_table(d1, "id INTEGER PRIMARY KEY", "", list(range(1, 251)))
    config = d1_config(d1, page_size=100) + 'order = "key"\n'
    source = open_source(_settings(env, config), "d1_usage")
    first = next(iter(source.pages(None, 1)))
    assert first.last_key == 100 and first.ack == list(range(1, 101))
    rest = list(source.pages(first.last_key, 10))
    assert [p.ack[0] for p in rest] == [101, 201]
    source.close()


def _usage_table(d1: Path, id_column: str, options: str, ids: list[Any]) -> None:
    """A hand-made D1 usage_events table (a shape write_d1_file does not make), one row per id."""
    conn = sqlite3.connect(d1, isolation_level=None)
    conn.execute(
        f"CREATE TABLE usage_events ({id_column}, organisation_id TEXT, project_id TEXT,"
        ' idempotency_key TEXT, metric_name TEXT, metric_value REAL, unit TEXT, "timestamp" TEXT,'
        f" metadata TEXT, processed_at TEXT) {options}"
    )
    conn.executemany(
        "INSERT INTO usage_events (id, organisation_id, idempotency_key, metric_name,"
        " metric_value, \"timestamp\") VALUES (?, 'o', ?, 'm', 1.0, '2025-01-01T00:00:00Z')",
        [(i, f"k{i}") for i in ids],
    )
    conn.close()


def _rows_by_rowid(d1: Path) -> dict[int, str]:
    conn = sqlite3.connect(d1)
    try:
        return dict(conn.execute("SELECT rowid, id FROM usage_events"))
    finally:
        conn.close()


def test_wrangler_local_layout(env: Env) -> None:
    state = env.dir / ".wrangler" / "state"
    path = d1_path(state, DB_ID)
    path.parent.mkdir(parents=True)
    write_d1_file(path, 300)
    settings = _settings(
        env,
        f"""
[sources.w]
kind = "d1"
stream = "usage_events"
wrangler_state = "{state}"
database_id = "{DB_ID}"
""",
    )
    source = open_source(settings, "w")
    assert sum(len(p.rows) for p in source.pages(None, 10)) == 300
    source.close()


def remote_config(fake: FakeD1, page_size: int = 500) -> str:
    return f"""
[pipeline]
page_size = {page_size}

[sources.d1_usage]
kind = "d1"
stream = "usage_events"
mode = "remote"
account_id = "{fake.account_id}"
database_id = "{DB_ID}"
base_url = "{fake.base_url}"
api_token_env = "TEST_D1_TOKEN"
batch_size = {page_size}
max_batches = 10
"""


@pytest.fixture
def fake() -> Iterator[FakeD1]:
    with FakeD1() as f:
        yield f


def test_remote_reads_and_marks_within_d1_limits(env: Env, fake: FakeD1) -> None:
    d1 = env.dir / "remote.sqlite"
    write_d1_file(d1, 1_200)
    fake.add_database(DB_ID, d1)
    env.vars["TEST_D1_TOKEN"] = fake.token
    settings = _settings(env, remote_config(fake))
    source = open_source(settings, "d1_usage")
    fake.fail_on(2, "rate_limit", retry_after=0)  # the 2nd request is throttled once
    fake.fail_on(3, "server_error", status=503)  # and the next answers with an HTML 503
    pages = list(source.pages(None, 10))
    assert [len(p.rows) for p in pages] == [500, 500, 200]
    source.acknowledge(pages[0].ack)
    assert d1_processed(d1) == (1_200, 500)
    bodies = [r.body for r in fake.requests if isinstance(r.body, dict)]
    marks = [b for b in bodies if "batch" in b]
    # 500 rows, 49 (rowid, id) pairs per statement; the source chose rowid order by EXPLAIN.
    # Each UPDATE is followed by a guard that rolls the batch back if it marked more rows.
    updates = [b for b in marks[0]["batch"] if b["sql"].startswith("UPDATE")] if marks else []
    assert len(marks) == 1 and len(updates) == 11 and len(marks[0]["batch"]) == 22
    for stmt in marks[0]["batch"]:
        assert len(stmt["params"]) <= 100
    assert all(r.authorized for r in fake.requests)
    source.close()


def test_remote_source_end_to_end(env: Env, fake: FakeD1) -> None:
    d1 = env.dir / "remote.sqlite"
    sample = write_d1_file(d1, 4_000)
    fake.add_database(DB_ID, d1)
    env.vars["TEST_D1_TOKEN"] = fake.token
    settings = _settings(env, remote_config(fake))
    ctx = app.configure(settings)
    migrate_sqlite(env.sqlite_path)
    fake.fail_next("d1_transient")  # a transient D1 error on the first read
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 2)
        pool.start_sqlite_writer()
        drain(ctx, "d1_usage")
    assert set(pg_keys(env.pg_url)) == sample.distinct_valid_keys
    assert set(sqlite_keys(env.sqlite_path)) == sample.distinct_valid_keys
    assert d1_processed(d1) == (4_000, 4_000)


def test_missing_local_file_is_a_clear_error(env: Env) -> None:
    settings = _settings(env, d1_config(env.dir / "absent.sqlite"))
    with pytest.raises(Exception, match="D1 file not found"):
        open_source(settings, "d1_usage")


def test_threads_acknowledge_through_one_source_side_by_side(env: Env) -> None:
    """A threads-pool worker's threads share the process's source (producers/ack.py): pages
    acknowledged at once each commit in their own transaction, none fails or is lost."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 4_000)
    source = open_source(_settings(env, d1_config(d1, page_size=50, max_batches=80)), "d1_usage")
    pages = list(source.pages(None, 80))
    assert len(pages) == 80
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def acknowledge(mine: list[Any]) -> None:
        start.wait()
        for p in mine:
            try:
                source.acknowledge(p.ack)
            except BaseException as exc:  # every failure is reported below
                errors.append(exc)

    threads = [threading.Thread(target=acknowledge, args=(pages[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    source.close()
    assert errors == []
    assert d1_processed(d1) == (4_000, 4_000)


# -- the source's own edges ----------------------------------------------------------------------


def _drain_in_process(ctx: Any, source: str) -> list[Any]:
    """Runs of the source until nothing is left, every task run in this process."""
    from sluice.producers.produce import run_source
    from tests.helpers import run_queued_tasks

    runs = []
    for _ in range(50):
        summary = run_source(ctx, source)
        runs.append(summary)
        run_queued_tasks(ctx)
        if summary.pages == 0 and ctx.progress.in_flight(source) == 0:
            return runs
    raise AssertionError(f"{source} did not drain: {runs[-1]}")


def test_text_that_is_not_utf8_is_a_dead_letter_not_a_stuck_source(env: Env) -> None:
    """One value SQLite holds as TEXT but that is not UTF-8: its record becomes a dead letter
    with the bytes kept, the run names its key and rowid, and every other row moves on."""
    from sqlalchemy import text

    from sluice.shared.letters import fetch_records
    from sluice.shared.state import StateStore

    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 3_000)
    conn = sqlite3.connect(d1)
    conn.execute(
        "UPDATE usage_events SET organisation_id = CAST(x'6f7267c328ff' AS TEXT) WHERE rowid = 1502"
    )
    bad_key = conn.execute("SELECT idempotency_key FROM usage_events WHERE rowid = 1502").fetchone()
    conn.commit()
    conn.close()
    settings = _settings(env, d1_config(d1, page_size=500))
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(settings)
    runs = _drain_in_process(ctx, "d1_usage")
    assert d1_processed(d1) == (3_000, 3_000)
    assert any("rowid=1502" in (r.error or "") for r in runs)
    store = StateStore(ctx.state.engine)
    with store.read() as c:
        ids = [
            r[0]
            for r in c.execute(
                text("SELECT id FROM failed_ingestions WHERE error_message LIKE '%got bytes%'")
            )
        ]
        records = fetch_records(c, ids)
    assert len(ids) == 2  # one letter per sink
    assert {records[i]["row"][1] for i in ids} == {b"org\xc3(\xff"}
    assert {records[i]["row"][3] for i in ids} == {bad_key[0]}
    valid = sample.distinct_valid_keys - {bad_key[0]}
    assert set(pg_keys(env.pg_url)) >= valid and set(sqlite_keys(env.sqlite_path)) >= valid


def test_a_key_column_typo_is_refused_before_anything_is_marked(env: Env) -> None:
    """SQLite reads an unknown quoted name as a text literal: `"idd" IN (...)` would match every
    row. The source checks its columns against the table first."""
    from tests.ops.test_cli import sluice

    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 50)
    env.write_config(d1_config(d1) + 'key_column = "idd"\n')
    source = open_source(Settings.load(env.vars), "d1_usage")
    with pytest.raises(Exception, match="key_column: column 'idd' is not in table"):
        list(source.pages(None, 10))
    source.close()
    assert d1_processed(d1) == (50, 0)
    out = sluice("config", "check", "--online", env=env.vars)
    assert out.returncode == 1 and "'idd' is not in table 'usage_events'" in out.stdout


def test_a_stream_column_missing_from_the_table_is_refused(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 20)
    conn = sqlite3.connect(d1)
    conn.execute("ALTER TABLE usage_events DROP COLUMN unit")  # else read back as the text 'unit'
    conn.close()
    source = open_source(_settings(env, d1_config(d1)), "d1_usage")
    with pytest.raises(Exception, match="stream usage_events: column 'unit' is not in table"):
        list(source.pages(None, 10))
    source.close()


def test_rows_with_a_null_key_are_marked_once_their_letters_are_stored(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 600)
    conn = sqlite3.connect(d1)
    conn.execute("UPDATE usage_events SET id = NULL WHERE rowid IN (3, 300, 599)")
    conn.commit()
    conn.close()
    for order in ("rowid", "key"):
        conn = sqlite3.connect(d1)
        conn.execute("UPDATE usage_events SET processed_at = NULL")
        conn.commit()
        conn.close()
        settings = _settings(env, d1_config(d1, page_size=100) + f'order = "{order}"\n')
        migrate_sqlite(env.sqlite_path)
        ctx = app.configure(settings)
        runs = _drain_in_process(ctx, "d1_usage")
        assert d1_processed(d1) == (600, 600), order
        assert runs[-1].records == 0  # the backlog reached zero: nothing read again


def test_a_mark_reaching_rows_never_read_is_rolled_back(env: Env) -> None:
    """A key column that is not unique: marking a page by key would also mark the rows of the
    same key that were never read. The mark is refused and nothing is marked."""
    d1 = env.dir / "d1.sqlite"
    _usage_table(d1, "id TEXT", "", ["a", "a", "b", "c"])
    source = open_source(_settings(env, d1_config(d1, page_size=1) + 'order = "key"\n'), "d1_usage")
    first = next(iter(source.pages(None, 1)))
    assert first.ack == ["a"]
    with pytest.raises(Exception, match="more rows than it read"):
        source.acknowledge(first.ack)
    source.close()
    assert d1_processed(d1) == (4, 0)


def test_a_transient_d1_error_on_the_order_probe_is_not_a_table_property(
    env: Env, fake: FakeD1
) -> None:
    d1 = env.dir / "remote.sqlite"
    write_d1_file(d1, 100)
    fake.add_database(DB_ID, d1)
    env.vars["TEST_D1_TOKEN"] = fake.token
    source = open_source(_settings(env, remote_config(fake)), "d1_usage")
    assert isinstance(source, D1Source)
    assert source.check() == [] and source.has_rowid
    fake.fail_next("d1_transient", count=5)  # every attempt of the probe
    with pytest.raises(Exception, match=r"D1 DB|overloaded|Network|reset"):
        _ = source.order
    assert source._order is None  # not settled on key order: the next run probes again
    assert source.order == "rowid"
    source.close()

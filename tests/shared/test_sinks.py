"""Sinks against real databases: keyed writes, redelivery, lock contention, poison records."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg2
import pytest

from sluice.consumers.ingest import ingest
from sluice.ops.sample import generate_rows
from sluice.ops.workers import WorkerPool
from sluice.shared.celery_app import app
from sluice.shared.database import libpq_dsn
from sluice.shared.errors import RejectedBySinkError, TransientSinkError
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.page import Page
from sluice.shared.records import Validator, dedupe
from sluice.shared.settings import Settings
from sluice.shared.sinks import PageMeta, Sink, WriteResult
from sluice.shared.sinks.postgres import PostgresSink, copy_text
from sluice.shared.sinks.sqlite import SqliteSink
from sluice.shared.streams import USAGE_EVENTS
from tests.conftest import Env
from tests.helpers import pg_keys, pg_scalar, sqlite_keys


def valid_rows(n: int) -> list[list[Any]]:
    rows, _, _ = generate_rows(n, seed=7)
    good, _ = Validator(USAGE_EVENTS).validate(USAGE_EVENTS.column_names, [list(r) for r in rows])
    return good


def meta(page_id: str, received: int) -> PageMeta:
    return PageMeta(page_id, "test", "run-1", received, 0, 1, datetime.now(UTC))


@pytest.fixture(params=["postgres", "sqlite"])
def sink(request: pytest.FixtureRequest, env: Env) -> Sink:
    if request.param == "postgres":
        return PostgresSink(env.pg_url)
    migrate_sqlite(env.sqlite_path)
    return SqliteSink(env.sqlite_path)


def test_keyed_write_counts_and_redelivery(sink: Sink) -> None:
    rows = valid_rows(2_000)
    page = dedupe(USAGE_EVENTS, rows)
    first = sink.write(USAGE_EVENTS, page, meta("p1", len(rows)))
    assert first.inserted == len(page)
    assert first.duplicates == len(rows) - len(page)
    # The same page delivered again: recognised, nothing written.
    again = sink.write(USAGE_EVENTS, page, meta("p1", len(rows)))
    assert again.already_committed and again.inserted == 0
    # The same records in another page: all duplicates, by key.
    other = sink.write(USAGE_EVENTS, page, meta("p2", len(page)))
    assert (other.inserted, other.duplicates) == (0, len(page))
    sink.close()


def test_sqlite_writer_waits_for_a_held_lock(env: Env) -> None:
    migrate_sqlite(env.sqlite_path)
    holder = sqlite3.connect(env.sqlite_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        time.sleep(2)
        holder.execute("COMMIT")
        released.set()

    threading.Thread(target=release).start()
    sink = SqliteSink(env.sqlite_path, busy_timeout_ms=30_000)
    rows = dedupe(USAGE_EVENTS, valid_rows(500))
    t0 = time.monotonic()
    result = sink.write(USAGE_EVENTS, rows, meta("locked", len(rows)))
    assert released.is_set() and time.monotonic() - t0 >= 1.5
    assert result.inserted == len(rows)
    sink.close()
    holder.close()


def test_sqlite_lock_held_past_the_timeout_is_transient(env: Env) -> None:
    migrate_sqlite(env.sqlite_path)
    holder = sqlite3.connect(env.sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    sink = SqliteSink(env.sqlite_path, busy_timeout_ms=200)
    rows = dedupe(USAGE_EVENTS, valid_rows(10))
    with pytest.raises(TransientSinkError, match="locked"):
        sink.write(USAGE_EVENTS, rows, meta("busy", len(rows)))
    holder.execute("ROLLBACK")
    # Nothing half-written: the retry writes the whole page.
    assert sink.write(USAGE_EVENTS, rows, meta("busy", len(rows))).inserted == len(rows)
    sink.close()
    holder.close()


def _write_in_threads(
    sink: SqliteSink, pages: dict[str, list[list[Any]]], stagger: float = 0.0
) -> dict[str, WriteResult | Exception]:
    """Each page written by its own thread, as the SQLite writer's threads pool does; the first
    thread gets `stagger` seconds' head start."""
    out: dict[str, WriteResult | Exception] = {}

    def one(page_id: str, rows: list[list[Any]]) -> None:
        try:
            out[page_id] = sink.write(USAGE_EVENTS, rows, meta(page_id, len(rows)))
        except Exception as exc:
            out[page_id] = exc

    threads = [threading.Thread(target=one, args=item) for item in pages.items()]
    for i, t in enumerate(threads):
        t.start()
        if i == 0:
            time.sleep(stagger)
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return out


def _locked(env: Env) -> sqlite3.Connection:
    holder = sqlite3.connect(env.sqlite_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _written_behind_a_held_lock(
    env: Env, sink: SqliteSink, pages: dict[str, list[list[Any]]]
) -> tuple[dict[str, WriteResult | Exception], int]:
    """The first page's thread waits for a lock another connection holds for 1.5 s; the others
    queue behind it meanwhile. Returns each page's outcome and how many COMMITs the sink ran."""
    statements: list[str] = []
    sink._connection().set_trace_callback(statements.append)
    holder = _locked(env)
    threading.Timer(1.5, lambda: holder.execute("COMMIT")).start()
    out = _write_in_threads(sink, pages, stagger=0.3)
    holder.close()
    return out, statements.count("COMMIT")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_sqlite_pages_of_every_size_keep_the_writer_small(env: Env) -> None:
    """Pages come in every size (duplicates shrink them), and a prepared INSERT holds about
    1.1 KB per row in SQLite: one statement per size held over 100 MB in the writer. The
    statements now take a few shapes, so a hundred page sizes cost a few MB, and every row
    still lands."""
    migrate_sqlite(env.sqlite_path)
    sink = SqliteSink(env.sqlite_path, cache_mib=2)
    rows = dedupe(USAGE_EVENTS, valid_rows(1_200))[:1_000]
    sink.write(USAGE_EVENTS, rows, meta("warm-up", len(rows)))  # the first full statement
    before = _rss_mb()
    written = len(rows)
    for size in range(901, 1_000):
        page = [[f"{r[0]}-{size}", *r[1:3], f"{r[3]}-{size}", *r[4:]] for r in rows[:size]]
        assert sink.write(USAGE_EVENTS, page, meta(f"p{size}", size)).inserted == size
        written += size
    grown = _rss_mb() - before
    sink.close()
    assert grown < 30, f"99 page sizes grew the writer by {grown:.0f} MB"
    assert len(sqlite_keys(env.sqlite_path)) == written


def test_sqlite_pages_written_together_share_one_transaction(env: Env) -> None:
    """Group commit: pages that arrive while a transaction is committing go in the next one,
    each counted on its own; a page repeating another's records counts them as duplicates."""
    migrate_sqlite(env.sqlite_path)
    rows = dedupe(USAGE_EVENTS, valid_rows(3_000))[:2_500]
    pages = {f"p{i}": rows[i * 500 : (i + 1) * 500] for i in range(5)}
    pages["again"] = pages["p2"]
    sink = SqliteSink(env.sqlite_path, busy_timeout_ms=30_000)
    out, commits = _written_behind_a_held_lock(env, sink, pages)
    results = {k: v for k, v in out.items() if isinstance(v, WriteResult)}
    assert len(results) == 6, out
    # p0 waited alone for the lock; the five pages queued meanwhile committed together.
    assert commits == 2
    assert sum(r.inserted for r in results.values()) == len({r[3] for r in rows})
    assert sorted(r.duplicates for r in results.values()) == [0, 0, 0, 0, 0, 500]
    assert set(sqlite_keys(env.sqlite_path)) == {r[3] for r in rows}
    lite = sqlite3.connect(env.sqlite_path)
    assert lite.execute("SELECT count(*) FROM ingestion_runs").fetchone()[0] == 6
    lite.close()
    sink.close()


def test_sqlite_refused_page_rolls_back_alone_in_its_group(env: Env) -> None:
    migrate_sqlite(env.sqlite_path)
    _refuse_negative_values_in_sqlite(env)
    lite = sqlite3.connect(env.sqlite_path)
    rows = dedupe(USAGE_EVENTS, valid_rows(2_500))[:2_000]
    pages = {f"p{i}": rows[i * 500 : (i + 1) * 500] for i in range(4)}
    pages["p2"][250][5] = -1.0  # mid-page: its first 250 rows were already inserted
    sink = SqliteSink(env.sqlite_path, busy_timeout_ms=30_000)
    out, commits = _written_behind_a_held_lock(env, sink, pages)
    assert commits == 2  # p1, p2 and p3 shared a transaction
    assert isinstance(out["p2"], RejectedBySinkError) and "non-negative" in str(out["p2"])
    assert all(isinstance(out[p], WriteResult) for p in ("p0", "p1", "p3")), out
    assert set(sqlite_keys(env.sqlite_path)) == {r[3] for p in ("p0", "p1", "p3") for r in pages[p]}
    runs = {r[0] for r in lite.execute("SELECT page_id FROM ingestion_runs")}
    assert runs == {"p0", "p1", "p3"}
    lite.close()
    sink.close()


def test_sqlite_group_that_cannot_begin_fails_every_page_and_writes_nothing(env: Env) -> None:
    migrate_sqlite(env.sqlite_path)
    rows = dedupe(USAGE_EVENTS, valid_rows(1_200))[:900]
    assert len(rows) == 900
    pages = {f"p{i}": rows[i * 300 : (i + 1) * 300] for i in range(3)}
    sink = SqliteSink(env.sqlite_path, busy_timeout_ms=300)
    holder = _locked(env)
    out = _write_in_threads(sink, pages)
    assert all(isinstance(e, TransientSinkError) and "locked" in str(e) for e in out.values()), out
    holder.execute("ROLLBACK")
    assert sqlite_keys(env.sqlite_path) == {}
    # Retried, each page is written whole.
    again = _write_in_threads(sink, pages)
    written = [r for r in again.values() if isinstance(r, WriteResult)]
    assert len(written) == 3 and sum(r.inserted + r.duplicates for r in written) == 900, again
    assert set(sqlite_keys(env.sqlite_path)) == {r[3] for r in rows}
    sink.close()
    holder.close()


def _refuse_negative_values(env: Env) -> None:
    """A rule the database enforces but the stream does not know: validation lets it through."""
    conn = psycopg2.connect(libpq_dsn(env.pg_url))
    with conn, conn.cursor() as cur:
        cur.execute(
            "ALTER TABLE usage_events ADD CONSTRAINT metric_value_non_negative"
            " CHECK (metric_value >= 0)"
        )
    conn.close()
    _refuse_negative_values_in_sqlite(env)


def _refuse_negative_values_in_sqlite(env: Env) -> None:
    lite = sqlite3.connect(env.sqlite_path)
    lite.execute(
        "CREATE TRIGGER refuse_negative BEFORE INSERT ON usage_events"
        " WHEN NEW.metric_value < 0 BEGIN SELECT RAISE(ABORT, 'metric_value must be"
        " non-negative'); END"
    )
    lite.commit()
    lite.close()


@pytest.mark.parametrize("sink_name", ["postgres", "sqlite"])
def test_poison_records_are_isolated_and_the_rest_committed(env: Env, sink_name: str) -> None:
    env.write_config("")
    app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    _refuse_negative_values(env)
    rows = dedupe(USAGE_EVENTS, valid_rows(1_300))[:1_000]
    poison = {17, 500, 999}
    for i in poison:
        rows[i][5] = -1.0
    page = Page(
        uuid.uuid4().hex,
        "usage_events",
        sink_name,
        "test",
        "run-1",
        list(USAGE_EVENTS.column_names),
        rows,
    )
    result = ingest.apply(args=[page.encode()]).get()
    assert (result["inserted"], result["dead_letters"]) == (997, 3)
    keys = pg_keys(env.pg_url) if sink_name == "postgres" else sqlite_keys(env.sqlite_path)
    assert set(keys) == {r[3] for i, r in enumerate(rows) if i not in poison}
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("dl", ["dead_letter"], 1)
        deadline = time.monotonic() + 30
        while pg_scalar(env.pg_url, "SELECT count(*) FROM failed_ingestions") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert (
        pg_scalar(
            env.pg_url,
            "SELECT count(*) FROM failed_ingestions WHERE error_class ="
            " 'RejectedBySink' AND error_message LIKE '%non%negative%'",
        )
        == 3
    )


def test_values_round_trip_exactly(sink: Sink, env: Env) -> None:
    """NULL stays NULL, '' stays '', and awkward text survives both sinks' encodings."""
    awkward = [
        "",
        "a,b",
        'quote " inside',
        "line\nbreak",
        "tab\there",
        "back\\slash\\N",
        "émoji 🚰",
        "\\.",
        "cr\r\nlf",
    ]
    rows = []
    for i, text in enumerate([*awkward, None]):
        rows.append(
            [
                f"id-{i}",
                "org",
                text,
                f"key-{i:02d}",
                "m",
                1.5 + i,
                None,
                "2026-11-25T00:00:00+00:00",
                '{"s": "x,\\"y\\""}',
            ]
        )
    sink.write(USAGE_EVENTS, dedupe(USAGE_EVENTS, rows), meta("awkward", len(rows)))
    if sink.name == "postgres":
        conn = psycopg2.connect(libpq_dsn(env.pg_url))
        with conn.cursor() as cur:
            cur.execute(
                "SELECT idempotency_key, project_id, unit, metric_value, metadata::text"
                " FROM usage_events ORDER BY idempotency_key"
            )
            got = cur.fetchall()
        conn.close()
    else:
        lite = sqlite3.connect(env.sqlite_path)
        got = lite.execute(
            "SELECT idempotency_key, project_id, unit, metric_value, metadata"
            " FROM usage_events ORDER BY idempotency_key"
        ).fetchall()
        lite.close()
    assert [g[1] for g in got] == [*awkward, None]
    assert all(g[2] is None for g in got)
    assert [g[3] for g in got] == [1.5 + i for i in range(len(rows))]
    assert all('x,\\"y\\"' in g[4] for g in got)
    sink.close()


def test_plain_page_round_trips_through_copy_text(sink: Sink, env: Env) -> None:
    """The fast COPY text path (no value needs escaping) keeps NULL and '' apart too, and a page
    holding one value that needs escaping goes the CSV way."""
    assert copy_text([["a", None, "", 1.5]]) == b"a\t\\N\t\t1.5\n"
    assert copy_text([["a", "tab\there"]]) is None and copy_text([["back\\slash"]]) is None
    rows = [
        [f"id-{i}", "org", text, f"key-{i}", "m", 2.5, None, "2026-11-25T00:00:00+00:00", "{}"]
        for i, text in enumerate(["", "plain", "émoji 🚰", None])
    ]
    sink.write(USAGE_EVENTS, dedupe(USAGE_EVENTS, rows), meta("plain", len(rows)))
    query = "SELECT project_id, unit FROM usage_events ORDER BY idempotency_key"
    if sink.name == "postgres":
        conn = psycopg2.connect(libpq_dsn(env.pg_url))
        with conn.cursor() as cur:
            cur.execute(query)
            got = cur.fetchall()
        conn.close()
    else:
        lite = sqlite3.connect(env.sqlite_path)
        got = lite.execute(query).fetchall()
        lite.close()
    assert got == [("", None), ("plain", None), ("émoji 🚰", None), (None, None)]
    sink.close()


def test_update_policy_last_write_wins(sink: Sink, env: Env) -> None:
    stream = USAGE_EVENTS.with_settings(sinks=(sink.name,), conflict="update")
    rows = dedupe(stream, valid_rows(300))
    sink.write(stream, rows, meta("u1", len(rows)))
    changed = [[*r[:5], 12345.0, *r[6:]] for r in rows[:50]]
    sink.write(stream, changed, meta("u2", len(changed)))
    query = "SELECT count(*) FROM usage_events WHERE metric_value = 12345.0"
    if sink.name == "postgres":
        assert pg_scalar(env.pg_url, query) == 50
        assert pg_scalar(env.pg_url, "SELECT count(*) FROM usage_events") == len(rows)
    else:
        lite = sqlite3.connect(env.sqlite_path)
        assert lite.execute(query).fetchone()[0] == 50
        assert lite.execute("SELECT count(*) FROM usage_events").fetchone()[0] == len(rows)
        lite.close()
    sink.close()

"""Nothing lost, nothing altered, at the edges: dead letters that keep every byte, a store that
refuses them, records that share a key, conflicts on columns that are not the key, races between
two reads of one key, and a deployment with no PostgreSQL at all."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from sluice.consumers.ingest import ingest
from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.database import libpq_dsn, postgres_engine, sqlite_connect
from sluice.shared.letters import DeadLetter, fetch_records, record_of_row, write_letters
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.page import Page
from sluice.shared.settings import Settings
from sluice.shared.sinks import PageMeta
from sluice.shared.sinks.sqlite import SqliteSink
from sluice.shared.state import StateStore, sqlite_engine
from sluice.shared.streams import HISTORICAL_PRICES, USAGE_EVENTS, Stream
from tests.conftest import Env
from tests.helpers import d1_config, d1_processed, drain, pg_scalar, wait_queues_empty
from tests.ops.test_cli import sluice

COLUMNS = list(USAGE_EVENTS.column_names)
ROOT = Path(__file__).resolve().parents[2]

# Values no one designed this code for: every byte, every escape that a JSON or SQL layer might
# "helpfully" interpret, control and format characters, other scripts, limits.
EDGE_TEXT = [
    "\\u0000",  # six characters: a backslash and "u0000", not a NUL
    "C:\\u0000\\temp",
    "org\x00x",  # a real NUL
    '{"a":"\\u0000"}',
    '{"a":"\\\\u0000"}',
    "\\",
    '"',
    "'; DROP TABLE usage_events; --",
    "\x1b[2J\x1b[H",  # clears a terminal
    "line\nbreak\r\n\ttab",
    "".join(chr(c) for c in range(0x20)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xA0)),
    "\u2028\u2029\ufeff\u200b\u200f\u202e",
    "😀👍🏽👨‍👩‍👧",
    "e\u0301 \u0915\u094d\u0937",  # combining marks
    "汉字かなカナ한국어",
    "مرحبا שלום",
    "\U0010ffff\U000e0001",
    "",
    "x" * 100_000,
]
EDGE_VALUES: list[Any] = [
    *EDGE_TEXT,
    bytes(range(256)),
    b"org\xc3(\xff",  # not UTF-8
    float("inf"),
    float("-inf"),
    1e308,
    5e-324,
    -0.0,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    True,
    None,
    [1, "a", None],
    {"nested": {"k": "\x00"}},
]


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        s = StateStore(postgres_engine(pg_url))
    else:
        path = tmp_path / "state.sqlite"
        migrate_sqlite(path)
        s = StateStore(sqlite_engine(path, 5_000))
    yield s
    s.dispose()


def letter(row: list[Any], key: str = "k", sink: str = "postgres") -> DeadLetter:
    return DeadLetter(
        stream="usage_events",
        sink=sink,
        source="test",
        page_id="p1",
        record_key=key,
        record=record_of_row(COLUMNS, row),
        error_class="ValidationError",
        error_message="metric_value: is required",
        record_order=1,
    )


def base_row(i: int = 0) -> list[Any]:
    return [
        f"id-{i}",
        "org",
        None,
        f"key-{i}",
        "m",
        1.5,
        None,
        "2026-01-01T00:00:00+00:00",
        None,
    ]


def stored(store: StateStore) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(
                text("SELECT id, record_key, payload, attempts FROM failed_ingestions ORDER BY id")
            )
        ]
        records = fetch_records(conn, [r["id"] for r in rows])
    for r in rows:
        r["record"] = records.get(r["id"])
        if isinstance(r["payload"], str):
            r["payload"] = json.loads(r["payload"])
    return rows


# -- the dead letters themselves ---------------------------------------------------------------


def test_a_letter_keeps_every_byte_and_escape_in_every_field(store: StateStore) -> None:
    """Each edge value in each field of a record: stored, and read back exactly."""
    letters = []
    originals = []
    for column in range(len(COLUMNS)):
        for n, value in enumerate(EDGE_VALUES):
            row = base_row(column * 1000 + n)
            row[column] = value
            originals.append(row)
            letters.append(letter(row, key=f"{column}:{n}"))
    assert write_letters(store, letters) == len(letters)
    got = stored(store)
    assert len(got) == len(letters)
    for r in got:
        assert "$unstorable" not in r["payload"]
    assert sorted((r["record"]["row"] for r in got), key=repr) == sorted(originals, key=repr)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(
        st.one_of(
            st.text(),
            st.binary(),
            st.floats(allow_nan=False),
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.none(),
        ),
        min_size=9,
        max_size=9,
    )
)
def test_any_record_comes_back_from_the_store_as_it_went_in(
    store: StateStore, values: list[Any]
) -> None:
    d = letter(values, key=str(uuid.uuid4()))
    write_letters(store, [d])
    with store.read() as conn:
        found = conn.execute(
            text("SELECT id FROM failed_ingestions WHERE record_key = :k"),
            {"k": d.record_key},
        ).scalar_one()
        assert fetch_records(conn, [found])[found]["row"] == values


def test_rows_sharing_a_key_keep_a_letter_each(store: StateStore) -> None:
    a, b = base_row(), base_row()
    b[1] = "another org"  # same key, another record
    write_letters(store, [letter(a), letter(b)])
    write_letters(store, [letter(a)])  # redelivered: the same letter, only its time moves
    got = stored(store)
    assert [r["record"]["row"] for r in got] == [a, b]
    assert [r["attempts"] for r in got] == [1, 1]


def _refuse_payloads_without(store: StateStore, marker: str) -> None:
    """A store that refuses a letter unless its payload holds `marker` (and every letter when
    marker is empty)."""
    with store.write() as conn:
        if store.dialect == "postgresql":
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    f" IF '{marker}' = '' OR position('{marker}' IN NEW.payload::text) = 0"
                    " THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON failed_ingestions"
                    " FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON failed_ingestions WHEN"
                    f" '{marker}' = '' OR instr(NEW.payload, '{marker}') = 0"
                    " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            )


def test_a_letter_the_store_refuses_is_kept_in_another_form(store: StateStore) -> None:
    _refuse_payloads_without(store, "$unstorable")
    row = base_row()
    row[1] = "C:\\u0000\\temp"
    write_letters(store, [letter(row), letter(base_row(1), key="k2")])
    got = stored(store)
    assert [r["record"]["row"] for r in got] == [row, base_row(1)]
    assert all("refused by the test" in r["payload"]["$unstorable"] for r in got)


def test_a_letter_no_form_of_which_is_accepted_raises(store: StateStore) -> None:
    _refuse_payloads_without(store, "")
    with pytest.raises(Exception, match="refused by the test"):
        write_letters(store, [letter(base_row())])
    assert stored(store) == []


# -- through the pipeline ----------------------------------------------------------------------


def _d1_with(path: Path, rows: list[list[Any]]) -> None:
    write_d1_file(path, 0)
    conn = sqlite3.connect(path)
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    conn.executemany(f"INSERT INTO usage_events ({cols}) VALUES ({', '.join('?' * 9)})", rows)
    conn.commit()
    conn.close()


def wait_for(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_a_page_waits_for_its_letters_while_the_store_refuses_them(env: Env) -> None:
    """The store refuses every letter: the letters wait on their queue, retried, and the D1 rows
    stay unprocessed; once the store takes them the rows are marked."""
    d1 = env.dir / "d1.sqlite"
    bad = base_row(99)
    bad[5] = None  # metric_value is required
    _d1_with(d1, [base_row(i) for i in range(5)] + [bad])
    env.write_config(d1_config(d1, page_size=100))
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    store = StateStore(postgres_engine(env.pg_url))
    _refuse_payloads_without(store, "")
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 2)
        pool.start_sqlite_writer()
        assert run_source(ctx, "d1_usage").records == 6
        wait_for(lambda: pg_scalar(env.pg_url, "SELECT count(*) FROM usage_events") == 5)
        time.sleep(3)  # the letters' first retries
        assert d1_processed(d1) == (6, 0)
        status = json.loads(sluice("status", "--json", env=env.vars).stdout)
        assert status["queues"]["dead_letter"]["total"] >= 1
        assert pg_scalar(env.pg_url, "SELECT count(*) FROM failed_ingestions") == 0
        with store.write() as conn:
            conn.execute(text("DROP TRIGGER refuse ON failed_ingestions"))
        wait_for(lambda: d1_processed(d1) == (6, 6), timeout=120)
    got = stored(store)
    assert {r["record"]["row"][0] for r in got} == {"id-99"}  # one record, two sinks' letters
    assert len(got) == 2
    store.dispose()


def test_valid_records_outlive_a_sink_down_beyond_its_retries_as_exact_letters(
    env: Env, tmp_path: Path
) -> None:
    """PostgreSQL (a sink and the state store) down longer than the retries: its pages become
    dead letters, which wait for the store; the D1 rows are marked only once they are stored,
    and a replay brings every record in exactly as the source had it."""
    from sluice.shared.embedded import ensure_postgres, stop_services
    from sluice.shared.migrations import migrate_postgres

    pg_dir = tmp_path / "pg"
    url = ensure_postgres(pg_dir)
    try:
        migrate_postgres(url)
        env.vars["SLUICE_POSTGRES_URL"] = env.pg_url = url
        d1 = env.dir / "d1.sqlite"
        rows = [base_row(i) for i in range(5)]
        rows[2][1] = "C:\\u0000\\temp"
        rows[3][1] = "\\\\u0000"
        _d1_with(d1, rows)
        env.write_config(d1_config(d1, page_size=100, max_retries=0))
        migrate_sqlite(env.sqlite_path)
        ctx = app.configure(Settings.load(env.vars))
        stop_services(pg_dir)
        with WorkerPool(env.vars, env.dir / "logs") as pool:
            pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 2)
            pool.start_sqlite_writer()
            assert run_source(ctx, "d1_usage").records == 5
            time.sleep(4)
            assert d1_processed(d1) == (5, 0)  # nothing marked while its letters wait
            assert ensure_postgres(pg_dir) == url
            wait_for(lambda: d1_processed(d1) == (5, 5), timeout=120)
            q = "SELECT count(*) FROM failed_ingestions WHERE error_class = 'RetriesExhausted'"
            assert pg_scalar(url, q) == 5
            assert "replayed 5 record(s)" in sluice("dlq", "replay", env=env.vars).stdout
            wait_for(lambda: pg_scalar(url, "SELECT count(*) FROM usage_events") == 5)
        conn = psycopg2.connect(libpq_dsn(url))
        with conn.cursor() as cur:
            cur.execute("SELECT id, organisation_id FROM usage_events ORDER BY id")
            assert cur.fetchall() == [(r[0], r[1]) for r in rows]
        conn.close()
    finally:
        stop_services(pg_dir)


def _ingest(ctx: Any, stream: Stream, sink: str, rows: list[list[Any]], seq: int) -> Any:
    page = Page(
        uuid.uuid4().hex, stream.name, sink, "test", "run", list(stream.column_names), rows, seq=seq
    )
    return ingest.apply(args=[page.encode()]).get()


def _letters_queued(ctx: Any) -> list[dict[str, Any]]:
    """The dead letters published to the queue (no worker here), decoded."""
    import base64

    import msgpack

    out = []
    for raw in ctx.redis.lrange("dead_letter", 0, -1):
        message = json.loads(raw)
        body = msgpack.unpackb(base64.b64decode(message["body"]), raw=False)
        out += [DeadLetter.from_message(d) for d in body[0][0]]
    return out


@pytest.mark.parametrize("sink", ["postgres", "sqlite"])
def test_a_conflict_on_another_unique_column_is_refused_not_a_duplicate(
    env: Env, sink: str
) -> None:
    """Two records with different keys and the same `id`: the second is not a duplicate of the
    first, the database refuses it, and it becomes a dead letter naming the constraint."""
    env.write_config("")
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    first, second = base_row(1), base_row(2)
    second[0] = first[0]  # same id, another idempotency key
    result = _ingest(ctx, USAGE_EVENTS, sink, [first, second], seq=100)
    assert (result["inserted"], result["duplicates"], result["dead_letters"]) == (1, 0, 1)
    [d] = _letters_queued(ctx)
    assert d.record_key == "key-2" and d.error_class == "RejectedBySink"
    assert "usage_events_pkey" in d.error_message or "usage_events.id" in d.error_message


@pytest.mark.parametrize("sink", ["postgres", "sqlite"])
def test_an_unchanged_refetch_is_counted_unchanged(env: Env, sink: str) -> None:
    env.write_config("")
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    bar = [
        "binance",
        "BTCUSDT",
        "1h",
        "2026-01-01T00:00:00Z",
        "1.5",
        "2",
        "1",
        "1.75",
        "10",
        "17.5",
        None,
        3,
    ]
    changed = [*bar[:7], "1.80", *bar[8:]]
    assert _ingest(ctx, HISTORICAL_PRICES, sink, [bar], 10)["inserted"] == 1
    again = _ingest(ctx, HISTORICAL_PRICES, sink, [bar], 20)
    assert (again["inserted"], again["updated"], again["unchanged"]) == (0, 0, 1)
    later = _ingest(ctx, HISTORICAL_PRICES, sink, [changed], 30)
    assert (later["inserted"], later["updated"], later["unchanged"]) == (0, 1, 0)


def _sink_rows(env: Env, sink: str, sql: str) -> list[tuple[Any, ...]]:
    if sink == "postgres":
        conn = psycopg2.connect(libpq_dsn(env.pg_url))
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.close()
        return rows
    lite = sqlite3.connect(env.sqlite_path)
    rows = lite.execute(sql).fetchall()
    lite.close()
    return rows


@pytest.mark.parametrize("sink", ["postgres", "sqlite"])
def test_two_reads_of_a_key_racing_end_the_same_in_every_sink(env: Env, sink: str) -> None:
    """Pages reach a sink in any order. `ignore` keeps the first read of a key, `update` the
    last, in every sink, whichever page arrives first."""
    env.write_config("")
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    early, late = base_row(1), base_row(2)
    late[3] = early[3]  # the same idempotency key read twice, with another id
    _ingest(ctx, USAGE_EVENTS, sink, [late], seq=200)  # the later read arrives first
    _ingest(ctx, USAGE_EVENTS, sink, [early], seq=100)
    assert _sink_rows(env, sink, "SELECT id FROM usage_events") == [("id-1",)]

    bar = [
        "binance",
        "BTCUSDT",
        "1h",
        "2026-01-01T00:00:00Z",
        "1",
        "1",
        "1",
        "1",
        None,
        None,
        None,
        None,
    ]
    newer = [*bar[:7], "2", *bar[8:]]
    _ingest(ctx, HISTORICAL_PRICES, sink, [newer], seq=400)  # the later fetch arrives first
    _ingest(ctx, HISTORICAL_PRICES, sink, [bar], seq=300)
    close = _sink_rows(env, sink, "SELECT close FROM historical_prices")
    assert [float(c) for (c,) in close] == [2.0]


# -- operators ----------------------------------------------------------------------------------


def test_replay_sends_the_record_exactly_as_it_arrived(env: Env) -> None:
    """A NUL in a text, an id that is bytes, an infinite number: each fails again on replay
    with the same error, as the same letter (its record unchanged), not as a new one."""
    env.write_config("")
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    rows = [base_row(i) for i in range(3)]
    rows[0][1] = "org\x00x"
    rows[1][0] = b"\x00\xffid"
    rows[2][5] = float("inf")
    store = StateStore(postgres_engine(env.pg_url))
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", ["ingest.postgres", "dead_letter", "progress"], 1)
        _ingest(ctx, USAGE_EVENTS, "postgres", rows, seq=1)
        wait_for(lambda: len(stored(store)) == 3)
        before = {r["record_key"]: r for r in stored(store)}
        out = sluice("dlq", "replay", env=env.vars)
        assert "replayed 3 record(s)" in out.stdout, out.stderr
        q = "SELECT count(*) FROM failed_ingestions WHERE status = 'pending' AND attempts = 2"
        wait_for(lambda: pg_scalar(env.pg_url, q) == 3)
    after = {r["record_key"]: r for r in stored(store)}
    assert after.keys() == before.keys()
    for key, r in after.items():
        assert r["record"] == before[key]["record"]
    messages = {
        str(r[0])
        for r in _sink_rows(env, "postgres", "SELECT error_message FROM failed_ingestions")
    }
    assert messages == {
        "organisation_id: contains a NUL byte (PostgreSQL rejects it)",
        "id: expected text, got bytes",
        "metric_value: inf is not a finite number",
    }
    store.dispose()


def test_dlq_list_escapes_control_characters_and_names_missing_ids(env: Env) -> None:
    env.write_config("")
    store = StateStore(postgres_engine(env.pg_url))
    write_letters(store, [letter(base_row(), key="k\x1b[2J\nnext")])
    store.dispose()
    table = sluice("dlq", "list", env=env.vars)
    assert table.returncode == 0
    assert "\x1b" not in table.stdout and "k\\x1b[2J\\nnext" in table.stdout
    assert len(table.stdout.strip().splitlines()) == 2  # the header and one row
    for action in ("replay", "discard"):
        out = sluice("dlq", action, "4242", "4343", env=env.vars)
        assert out.returncode != 0
        assert "no dead letter with id 4242, 4343" in out.stderr
    assert pg_scalar(env.pg_url, "SELECT status FROM failed_ingestions") == "pending"


def test_produce_of_an_unknown_source_records_no_run(env: Env) -> None:
    env.write_config("")
    out = sluice("produce", "nosuch", env=env.vars)
    assert out.returncode != 0 and "unknown source 'nosuch'" in out.stderr
    assert "Traceback" not in out.stderr
    assert pg_scalar(env.pg_url, "SELECT count(*) FROM source_runs") == 0


# -- a deployment with no PostgreSQL ------------------------------------------------------------


def test_a_sqlite_only_deployment_keeps_runs_and_dead_letters_in_its_file(env: Env) -> None:
    """Every stream writes to SQLite only: dead letters, runs and status live in the SQLite
    file, and nothing starts or needs a PostgreSQL."""
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 2_000)
    env.vars.pop("SLUICE_POSTGRES_URL")
    env.write_config(
        d1_config(d1, page_size=500) + '\n[streams.usage_events]\nsinks = ["sqlite"]\n'
    )
    assert sluice("migrate", env=env.vars).returncode == 0
    ctx = app.configure(Settings.load(env.vars))
    assert ctx.state.dialect == "sqlite"
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("letters", ["dead_letter", "progress"], 1)
        pool.start_sqlite_writer()
        drain(ctx, "d1_usage")
        wait_queues_empty(ctx)
    assert d1_processed(d1) == (2_000, 2_000)
    listed = json.loads(sluice("dlq", "list", "--json", env=env.vars).stdout)
    assert len(listed) == sample.invalid
    seed_query = "SELECT * FROM failed_ingestions ORDER BY failed_at DESC LIMIT 10"
    lite = sqlite_connect(env.sqlite_path)
    assert len(lite.execute(seed_query).fetchall()) == sample.invalid
    assert lite.execute("SELECT count(*) FROM source_runs").fetchone()[0] >= 1
    lite.close()
    status = sluice("status", "--json", env=env.vars)
    doc = json.loads(status.stdout)
    assert doc["state"] == "sqlite" and doc["errors"] == {}
    assert doc["dead_letters"]["pending"] == sample.invalid
    assert doc["sources"]["d1_usage"]["last_run"]["status"] == "ok"
    assert not (env.dir / "data" / "postgres").exists()  # no embedded PostgreSQL was started


def test_the_seed_troubleshooting_query_runs_on_both_sinks(env: Env) -> None:
    migrate_sqlite(env.sqlite_path)
    query = "SELECT * FROM failed_ingestions ORDER BY failed_at DESC LIMIT 10"
    assert _sink_rows(env, "postgres", query) == []
    assert _sink_rows(env, "sqlite", query) == []


def test_sqlite_page_times_are_never_negative(tmp_path: Path) -> None:
    """A page's start and commit times are stored alike (milliseconds, Z), so a page that
    commits within the millisecond it started never shows a negative time or rate."""
    path = tmp_path / "sink.sqlite"
    migrate_sqlite(path)
    sink = SqliteSink(path)
    for i in range(300):  # tiny pages: many commit within the millisecond they started
        meta = PageMeta(f"p{i}", "s", "r", 1, 0, 1, datetime.now(UTC))
        sink.write(USAGE_EVENTS, [base_row(i)], meta)
    sink.close()
    lite = sqlite3.connect(path)
    shortest = lite.execute(
        "SELECT min(julianday(committed_at) - julianday(started_at)) FROM ingestion_runs"
    ).fetchone()[0]
    lowest = lite.execute(
        "SELECT min(avg_page_seconds), min(rows_per_second) FROM ingestion_performance"
    ).fetchone()
    lite.close()
    assert shortest >= 0
    assert lowest[0] >= 0 and lowest[1] > 0


# -- the run lock -------------------------------------------------------------------------------


def test_a_run_lock_is_a_lease_renewed_while_alive_and_freed_when_its_owner_dies(
    env: Env,
) -> None:
    import os
    import signal
    import subprocess
    import sys

    import redis

    from sluice.producers.produce import SourceLock

    client = redis.Redis.from_url(env.redis_url)
    held = SourceLock(client, "s", lease=1.0)
    assert held.acquire()
    time.sleep(3)  # three leases long: renewed meanwhile
    assert not SourceLock(client, "s", lease=1.0).acquire()
    held.release()
    assert SourceLock(client, "s", lease=1.0).acquire()

    # A run killed mid-way (no release): its source is free once the lease runs out.
    code = (
        "import sys, time, redis; from producers.produce import SourceLock;"
        f" lock = SourceLock(redis.Redis.from_url({env.redis_url!r}), 'k', lease=2.0);"
        " assert lock.acquire(); print('held', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    assert child.stdout is not None and child.stdout.readline().strip() == b"held"
    time.sleep(3)
    assert not SourceLock(client, "k", lease=2.0).acquire()  # renewed while the child lives
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 4
    while not SourceLock(client, "k", lease=2.0).acquire():
        assert time.monotonic() < deadline, "the dead run's lock was not freed"
        time.sleep(0.2)
    client.close()


def test_an_event_time_in_the_future_is_not_a_negative_lag(env: Env) -> None:
    from sluice.ops.status import collect_sources
    from sluice.shared.sinks.postgres import PostgresSink

    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(d1_config(d1))
    ctx = app.configure(Settings.load(env.vars))
    row = base_row()
    row[7] = "2099-01-01T00:00:00+00:00"  # a source clock far ahead
    sink = PostgresSink(env.pg_url)
    sink.write(USAGE_EVENTS, [row], PageMeta("p", "d1_usage", "r", 1, 0, 1, datetime.now(UTC)))
    sink.close()
    engine = postgres_engine(env.pg_url)
    errors: dict[str, str] = {}
    doc = collect_sources(ctx, engine, StateStore(engine), errors)["d1_usage"].as_dict()
    engine.dispose()
    assert errors == {}
    assert doc["lag_seconds"] == 0
    assert "2099-01-01" in doc["future_times"]

"""Seed 002's correctness properties, with hypothesis, against both sinks (real SQLite and
PostgreSQL): foreign keys and unique keys enforced, the migration idempotent (schema and data:
twice = once), no SQL injection through keys or values, every KV entry lands or is refused with
a reason, per-user counts match, a failed page rolls back whole, and the common queries use
an index."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.producers.kv_source import KvSource, Problem
from sluice.producers.registry import open_source
from sluice.shared.database import libpq_dsn
from sluice.shared.errors import ForeignKeyViolationError, RejectedBySinkError
from sluice.shared.migrations import SCHEMA_DIR, migrate_postgres, migrate_sqlite, split_statements
from sluice.shared.records import Validator, dedupe
from sluice.shared.settings import Settings
from sluice.shared.sinks import PageMeta, Sink, WriteResult
from sluice.shared.sinks.postgres import PostgresSink
from sluice.shared.sinks.sqlite import SqliteSink
from sluice.shared.streams import CATALOG, Stream

PROPS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BOT_TABLES = ("executions", "watchlists", "active_positions", "cache", "users")
NOW_MS = 1_700_000_000_000


@pytest.fixture
def sinks(tmp_path: Path, pg_url: str) -> Iterator[list[Sink]]:
    path = tmp_path / "sink.sqlite"
    migrate_sqlite(path)
    both: list[Sink] = [SqliteSink(path), PostgresSink(pg_url)]
    yield both
    for s in both:
        s.close()


def _meta(n: int) -> PageMeta:
    return PageMeta(uuid.uuid4().hex, "test", "run", n, 0, 1, datetime.now(UTC))


def write(sink: Sink, stream: Stream, rows: list[list[Any]]) -> tuple[WriteResult, int]:
    """What the consumer does before the write: validate, dedupe. Returns the result and how
    many rows validation refused (they would be dead letters)."""
    good, bad = Validator(stream).validate(stream.column_names, rows)
    return sink.write(stream, dedupe(stream, good), _meta(len(rows))), len(bad)


def query(sink: Sink, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(sink, SqliteSink):
        conn = sqlite3.connect(sink.path)
        try:
            out = list(conn.execute(sql.replace("%s", "?"), params).fetchall())
            conn.commit()
            return out
        finally:
            conn.close()
    assert isinstance(sink, PostgresSink)
    pg = psycopg2.connect(sink._dsn)
    try:
        with pg.cursor() as cur:
            cur.execute(sql, params)
            out = list(cur.fetchall()) if cur.description else []
        pg.commit()
        return out
    finally:
        pg.close()


def reset(sinks: list[Sink]) -> None:
    for sink in sinks:
        for table in (*BOT_TABLES, "ingestion_runs"):
            if isinstance(sink, SqliteSink):
                conn = sqlite3.connect(sink.path)
                conn.execute(f"DELETE FROM {table}")
                conn.commit()
                conn.close()
            else:
                query(sink, f"DELETE FROM {table}")


def count(sink: Sink, table: str) -> int:
    return int(query(sink, f"SELECT count(*) FROM {table}")[0][0])


USERS, WATCHLISTS, EXECUTIONS, POSITIONS = (
    CATALOG["users"],
    CATALOG["watchlists"],
    CATALOG["executions"],
    CATALOG["active_positions"],
)
# Text that SQL would choke on if it were ever spliced into a statement.
NASTY = st.text(
    alphabet=st.sampled_from(list("'\";-- \\%_*/()DROPTABLEusersé東🙂\x00\n\tx1")),
    min_size=1,
    max_size=20,
) | st.sampled_from(["'; DROP TABLE users; --", "1' OR '1'='1", '"); DELETE FROM users; --'])
IDS = st.text(alphabet="0123456789-", min_size=1, max_size=12)
TICKERS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ.", min_size=1, max_size=6)


# -- Property 1 and 2: foreign keys and unique keys ---


@PROPS
@given(chat_id=NASTY.filter(lambda s: "\x00" not in s), ticker=TICKERS)
def test_p1_child_without_parent_is_rejected_as_a_foreign_key_violation(
    sinks: list[Sink], chat_id: str, ticker: str
) -> None:
    reset(sinks)
    for sink in sinks:
        with pytest.raises(ForeignKeyViolationError):
            write(sink, WATCHLISTS, [[chat_id, ticker, NOW_MS]])
        with pytest.raises(ForeignKeyViolationError):
            write(sink, POSITIONS, [[chat_id, ticker, 1.0, NOW_MS, NOW_MS]])
        assert count(sink, "watchlists") == count(sink, "active_positions") == 0
        write(sink, USERS, [[chat_id, 1, NOW_MS, NOW_MS]])
        result, _ = write(sink, WATCHLISTS, [[chat_id, ticker, NOW_MS]])
        assert result.inserted == 1


@PROPS
@given(chat_id=IDS, ticker=TICKERS, prices=st.lists(st.floats(0.01, 1e6), min_size=2, max_size=5))
def test_p2_unique_keys_hold_one_row_and_refuse_a_plain_duplicate(
    sinks: list[Sink], chat_id: str, ticker: str, prices: list[float]
) -> None:
    reset(sinks)
    for sink in sinks:
        write(sink, USERS, [[chat_id, 1, NOW_MS, NOW_MS]])
        for price in prices:  # one page per write: conflicts across pages, first one wins
            write(sink, POSITIONS, [[chat_id, ticker, price, NOW_MS, NOW_MS]])
        rows = query(sink, "SELECT entry_price FROM active_positions")
        assert rows == [(prices[0],)]
        # Without ON CONFLICT the database itself refuses the duplicate.
        sql = (
            "INSERT INTO active_positions (chat_id, ticker, entry_price, created_at, updated_at)"
            " VALUES (%s, %s, 1.0, 0, 0)"
        )
        with pytest.raises((sqlite3.IntegrityError, psycopg2.IntegrityError)):
            query(sink, sql, (chat_id, ticker))


# -- Property 3: migration idempotency ---


def sqlite_schema(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name"))
    finally:
        conn.close()


def test_p3_schema_applies_twice_with_the_same_result(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "s.sqlite"
    migrate_sqlite(path)
    once = sqlite_schema(path)
    conn = sqlite3.connect(path)
    for file in sorted((SCHEMA_DIR / "sqlite").glob("*.sql")):
        if "-- sluice: applies once" in file.read_text():
            continue  # it alters tables: recorded as applied, never run again
        for statement in split_statements(file.read_text()):
            conn.execute(statement)  # every file again, by hand, as wrangler would
    conn.commit()
    conn.close()
    assert sqlite_schema(path) == once
    assert migrate_sqlite(path) == []
    pg_sql = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
    pg = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with pg.cursor() as cur:
            cur.execute(pg_sql)
            before = cur.fetchall()
            cur.execute((SCHEMA_DIR / "postgres" / "0003_kv_bot_and_job_results.sql").read_text())
            cur.execute(pg_sql)
            assert cur.fetchall() == before
        pg.commit()
    finally:
        pg.close()
    assert migrate_postgres(pg_url) == []


def namespace() -> st.SearchStrategy[dict[str, Any]]:
    """A bot's KV data: users, their watchlists (with repeats), executions and positions, some
    for users that do not exist, and the odd value that is not what the mapper expects."""

    def build(ids: list[str], draw_lists: list[list[str]], extra: list[str]) -> dict[str, Any]:
        data: dict[str, Any] = {"chat_ids": ids}
        for cid, tickers in zip(ids + extra, draw_lists, strict=False):
            data[f"watchlist:{cid}"] = tickers
            data[f"execution_history:{cid}"] = [
                {
                    "signalType": "BUY" if i % 2 else "SELL",
                    "ticker": t,
                    "executionPrice": 1.5 + i,
                    "executionDate": NOW_MS + i,
                }
                for i, t in enumerate(tickers)
            ]
            if tickers:
                data[f"active_position:{cid}"] = {"ticker": tickers[0], "entryPrice": 2.5}
        return data

    ids = st.lists(IDS, min_size=1, max_size=6, unique=True)
    return st.builds(
        build,
        ids,
        st.lists(st.lists(TICKERS, max_size=4), min_size=1, max_size=8),
        st.lists(IDS.map(lambda s: "orphan" + s), max_size=2, unique=True),
    )


def kv_from_export(tmp_path: Path, data: dict[str, Any]) -> KvSource:
    export = tmp_path / f"kv-{uuid.uuid4().hex}.json"
    export.write_text(json.dumps([{"key": k, "value": v} for k, v in data.items()]))
    cfg = tmp_path / f"sluice-{uuid.uuid4().hex}.toml"
    cfg.write_text(f'[sources.bot]\nkind = "kv"\nmode = "local"\npath = "{export}"\n')
    source = open_source(Settings.load({"SLUICE_CONFIG": str(cfg)}), "bot")
    assert isinstance(source, KvSource)
    return source


def migrate_once(
    source: KvSource, sink: Sink
) -> tuple[dict[str, list[list[Any]]], int, list[Problem]]:
    """Map the namespace and write it as the consumer would, parents first; a page refused for a
    missing parent is isolated row by row (orphans are what the dead letters would hold)."""
    problems: list[Problem] = []
    by_stream: dict[str, list[list[Any]]] = {}
    for stream, row in source.records(NOW_MS, problems.append):
        by_stream.setdefault(stream.name, []).append(row)
    refused = 0
    for name, rows in by_stream.items():
        stream = CATALOG[name]
        try:
            write(sink, stream, rows)
        except ForeignKeyViolationError:
            for row in dedupe(stream, rows):
                try:
                    write(sink, stream, [row])
                except ForeignKeyViolationError:
                    refused += 1
    return by_stream, refused, problems


def table_state(sink: Sink) -> dict[str, list[tuple[Any, ...]]]:
    cols = {
        "users": "chat_id, subscription_status",
        "watchlists": "chat_id, ticker",
        "executions": "chat_id, execution_date, ticker, signal_type, execution_price",
        "active_positions": "chat_id, ticker, entry_price",
        "cache": "cache_key, cache_value",
    }
    return {t: sorted(query(sink, f"SELECT {c} FROM {t}")) for t, c in cols.items()}


@settings(PROPS, max_examples=12)
@given(data=namespace())
def test_p3_p6_to_p16_migration_twice_is_once_complete_and_counts_match(
    tmp_path: Path, sinks: list[Sink], data: dict[str, Any]
) -> None:
    reset(sinks)
    source = kv_from_export(tmp_path, data)
    users = set(data["chat_ids"])
    for sink in sinks:
        by_stream, refused, problems = migrate_once(source, sink)
        first = table_state(sink)
        migrate_once(source, sink)
        assert table_state(sink) == first  # twice = once
        assert problems == []
        # Completeness: every distinct record is in its table, or refused for a missing parent.
        orphans = 0
        for name, rows in by_stream.items():
            stream = CATALOG[name]
            distinct = {tuple(r[i] for i in stream.key_indexes) for r in rows}
            orphans += sum(1 for k in distinct if stream.foreign_keys and k[0] not in users)
            assert count(sink, name) == len(distinct) - sum(
                1 for k in distinct if stream.foreign_keys and k[0] not in users
            )
        assert refused == orphans
        # Count validation: per user, the table holds as many distinct tickers as KV.
        for cid in users:
            kv = len(set(data.get(f"watchlist:{cid}", [])))
            rows = query(sink, "SELECT count(*) FROM watchlists WHERE chat_id = %s", (cid,))
            assert rows[0][0] == kv
        assert set(r[0] for r in query(sink, "SELECT chat_id FROM users")) == users
    source.close()


# -- Property 4: no SQL injection ---


@PROPS
@given(chat_id=NASTY, tickers=st.lists(NASTY, min_size=1, max_size=4))
def test_p4_keys_and_values_are_data_never_sql(
    tmp_path: Path, sinks: list[Sink], chat_id: str, tickers: list[str]
) -> None:
    reset(sinks)
    data = {"chat_ids": [chat_id], f"watchlist:{chat_id}": tickers}
    source = kv_from_export(tmp_path, data)
    for sink in sinks:
        rows_by: dict[str, list[list[Any]]] = {}
        for stream, row in source.records(NOW_MS, lambda p: None):
            rows_by.setdefault(stream.name, []).append(row)
        _, bad_users = write(sink, USERS, rows_by["users"])
        if "\x00" in chat_id:
            assert bad_users == 1  # NUL: refused by validation, a dead letter
            assert count(sink, "users") == 0
            continue
        assert query(sink, "SELECT chat_id FROM users") == [(chat_id,)]
        _, bad = write(sink, WATCHLISTS, rows_by["watchlists"])
        stored = Counter(r[0] for r in query(sink, "SELECT ticker FROM watchlists"))
        good = {t for t in tickers if "\x00" not in t}
        assert set(stored) == good and set(stored.values()) <= {1}
        assert bad == sum(1 for t in tickers if "\x00" in t)
        for table in BOT_TABLES:  # nothing was dropped or emptied by a value
            count(sink, table)
    source.close()


# -- Property 19: a failed page rolls back whole ---


@PROPS
@given(good=st.integers(1, 20), bad_at=st.integers(0, 20))
def test_p19_a_failed_page_commits_nothing(sinks: list[Sink], good: int, bad_at: int) -> None:
    reset(sinks)
    rows = [["1", NOW_MS + i, "SPY", "BUY", 1.0, None, NOW_MS] for i in range(good)]
    rows.insert(min(bad_at, good), ["1", NOW_MS - 1, "SPY", "HOLD", 1.0, None, NOW_MS])
    for sink in sinks:
        write(sink, USERS, [["1", 1, NOW_MS, NOW_MS]])
        runs = count(sink, "ingestion_runs")
        with pytest.raises(RejectedBySinkError) as caught:
            write(sink, EXECUTIONS, rows)  # CHECK(signal_type IN ('BUY','SELL')) refuses HOLD
        assert not isinstance(caught.value, ForeignKeyViolationError)
        assert count(sink, "executions") == 0
        assert count(sink, "ingestion_runs") == runs  # not even the page's own record


# -- Properties 22-26: the common queries use an index ---

QUERIES: list[tuple[str, str, tuple[Any, ...]]] = [
    ("users", "SELECT subscription_status FROM users WHERE chat_id = %s", ("1",)),
    ("users", "SELECT chat_id FROM users WHERE subscription_status = %s", (1,)),
    ("watchlists", "SELECT ticker FROM watchlists WHERE chat_id = %s", ("1",)),
    ("watchlists", "SELECT chat_id FROM watchlists WHERE ticker = %s", ("SPY",)),
    (
        "executions",
        "SELECT * FROM executions WHERE chat_id = %s ORDER BY execution_date DESC LIMIT 1",
        ("1",),
    ),
    ("executions", "SELECT * FROM executions WHERE chat_id = %s AND ticker = %s", ("1", "SPY")),
    ("executions", "SELECT * FROM executions WHERE execution_date > %s", (NOW_MS,)),
    (
        "active_positions",
        "SELECT * FROM active_positions WHERE chat_id = %s AND ticker = %s",
        ("1", "SPY"),
    ),
    ("active_positions", "SELECT * FROM active_positions WHERE chat_id = %s", ("1",)),
    ("cache", "SELECT cache_value FROM cache WHERE cache_key = %s", ("k",)),
    ("cache", "DELETE FROM cache WHERE expires_at < %s", (NOW_MS,)),
    ("scheduled_job_results", "SELECT * FROM scheduled_job_results WHERE report_type = %s", ("d",)),
    (
        "scheduled_job_results",
        "SELECT * FROM scheduled_job_results ORDER BY scheduled_date DESC LIMIT 10",
        (),
    ),
]


@pytest.mark.parametrize(("table", "sql", "params"), QUERIES, ids=[q[1][:60] for q in QUERIES])
def test_p22_to_p26_common_queries_use_an_index(
    tmp_path: Path, pg_url: str, table: str, sql: str, params: tuple[Any, ...]
) -> None:
    path = tmp_path / "s.sqlite"
    migrate_sqlite(path)
    conn = sqlite3.connect(path)
    try:
        lines = [
            str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql.replace("%s", "?"), params)
        ]
    finally:
        conn.close()
    # SEARCH … USING INDEX, or a SCAN in index order (ORDER BY … LIMIT); never a plain scan.
    assert any("INDEX" in line for line in lines), lines
    assert not any(line.startswith(f"SCAN {table}") and "INDEX" not in line for line in lines)
    pg = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with pg.cursor() as cur:
            cur.execute("SET enable_seqscan = off")  # empty tables: ask what it would use
            cur.execute("EXPLAIN " + sql, params)
            plan = " | ".join(r[0] for r in cur.fetchall())
        pg.rollback()
    finally:
        pg.close()
    assert "Index" in plan and "Seq Scan" not in plan, plan


# -- report snapshots (scheduled jobs) are upserted by (scheduled_date, report_type) -------------

SNAPSHOTS = st.lists(
    st.tuples(
        st.sampled_from(["2025-01-01", "2025-01-02"]),
        st.sampled_from(["pre-market", "end-of-day"]),
        st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s),
    ),
    min_size=1,
    max_size=8,
)


@settings(PROPS, max_examples=15)
@given(snapshots=SNAPSHOTS)
def test_scheduled_job_results_last_write_wins_per_date_and_type(
    sinks: list[Sink], snapshots: list[tuple[str, str, str]]
) -> None:
    stream = CATALOG["scheduled_job_results"]
    assert stream.conflict == "update"
    last = {(d, t): c for d, t, c in snapshots}
    for sink in sinks:
        query(sink, "DELETE FROM scheduled_job_results")
        for d, t, c in snapshots:  # one page each: later pages replace earlier snapshots
            write(sink, stream, [[d, t, c, None, "cron", None]])
        rows = query(
            sink, "SELECT scheduled_date, report_type, report_content FROM scheduled_job_results"
        )
        assert {(d, t): c for d, t, c in rows} == last and len(rows) == len(last)

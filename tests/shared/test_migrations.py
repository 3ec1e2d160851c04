"""Schema migrations: applied once, idempotent files, safe concurrent runs, D1-compatible SQLite."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from sluice.shared.database import libpq_dsn, sqlite_connect
from sluice.shared.migrations import (
    SCHEMA_DIR,
    migrate_postgres,
    migrate_sqlite,
    migration_files,
    split_statements,
)

TABLES = {
    "usage_events",
    "ingestion_runs",
    "source_runs",
    "source_progress",
    "failed_ingestions",
    "sluice_migrations",
}
SQLITE_FILES = sorted((SCHEMA_DIR / "sqlite").glob("*.sql"))
POSTGRES_FILES = sorted((SCHEMA_DIR / "postgres").glob("*.sql"))
D1_FILES = SQLITE_FILES + sorted((SCHEMA_DIR / "d1_source").glob("*.sql"))


def earlier_files(file: Path) -> list[Path]:
    """The files of the same folder numbered before `file`: a later migration may build on
    them (0002's views read 0001's ingestion_runs), as wrangler applies them in order."""
    return [f for f in sorted(file.parent.glob("*.sql")) if f.name < file.name]


def apply_earlier(conn: sqlite3.Connection, file: Path) -> None:
    for earlier in earlier_files(file):
        for statement in split_statements(earlier.read_text()):
            conn.execute(statement)


def versions(dialect: str) -> list[str]:
    return [v for v, _ in migration_files(dialect)]


def test_there_is_something_to_migrate() -> None:
    assert SQLITE_FILES and POSTGRES_FILES
    assert versions("sqlite") == versions("postgres"), "both dialects move in step"
    assert versions("sqlite") == sorted(versions("sqlite"))


# --- SQLite --------------------------------------------------------------------------------------


def sqlite_tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows if not r[0].startswith("sqlite_")}


def test_migrate_sqlite_applies_every_version_once(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "sink.sqlite"  # the folder is created
    assert migrate_sqlite(path) == versions("sqlite")
    assert migrate_sqlite(path) == []
    conn = sqlite3.connect(path)
    try:
        assert sqlite_tables(conn) >= TABLES
        recorded = [r[0] for r in conn.execute("SELECT version FROM sluice_migrations")]
        assert sorted(recorded) == versions("sqlite")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_sqlite_connections_enforce_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "sink.sqlite"
    migrate_sqlite(path)
    conn = sqlite_connect(path)
    try:
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE child (parent_id INTEGER REFERENCES parent (id))")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            conn.execute("INSERT INTO child VALUES (1)")
    finally:
        conn.close()


def test_concurrent_sqlite_migrations_record_each_version_once(tmp_path: Path) -> None:
    path = tmp_path / "sink.sqlite"
    results, errors = run_concurrently(lambda: migrate_sqlite(path), 4)
    assert errors == []
    assert sorted(v for r in results for v in r) == versions("sqlite")
    conn = sqlite3.connect(path)
    try:
        recorded = [r[0] for r in conn.execute("SELECT version FROM sluice_migrations")]
    finally:
        conn.close()
    assert sorted(recorded) == versions("sqlite")


def repeatable(file: Path) -> bool:
    """Whether a schema file may be applied twice. One that alters tables says `applies once`
    (SQLite has no ADD COLUMN IF NOT EXISTS); the runner records it and never applies it again."""
    return "-- sluice: applies once" not in file.read_text()


@pytest.mark.parametrize("file", D1_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sqlite_schema_file_applies_twice(tmp_path: Path, file: Path) -> None:
    """Every statement is idempotent, so `wrangler d1 execute --file` can be run again; a file
    that says it applies once applies after the earlier ones, and the runner never repeats it."""
    statements = split_statements(file.read_text())
    assert statements
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    try:
        apply_earlier(conn, file)
        for _ in range(2 if repeatable(file) else 1):
            for statement in statements:
                conn.execute(statement)
        assert "usage_events" in sqlite_tables(conn)
    finally:
        conn.close()
    if not repeatable(file):
        path = tmp_path / "runner.sqlite"
        assert file.stem in migrate_sqlite(path)
        assert migrate_sqlite(path) == []


def test_a_failed_sqlite_file_leaves_nothing_behind(tmp_path: Path) -> None:
    """The runner wraps each file in a transaction with its version row."""
    path = tmp_path / "sink.sqlite"
    conn = sqlite3.connect(path)
    # A conflicting object makes the file fail part way (after usage_events is created).
    conn.execute("CREATE VIEW ingestion_runs AS SELECT 1 AS x")
    conn.close()
    with pytest.raises(Exception, match=r"0001_core\.sql failed"):
        migrate_sqlite(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM sluice_migrations").fetchone()[0] == 0
        assert "usage_events" not in sqlite_tables(conn)
    finally:
        conn.close()


# --- split_statements ----------------------------------------------------------------------------


def test_split_statements_respects_quotes_and_comments() -> None:
    sql = """
-- a header; with a semicolon
CREATE TABLE t (a TEXT DEFAULT ';', b TEXT); -- trailing; comment
/* block; comment */ CREATE INDEX i ON t (a);

INSERT INTO t (a) VALUES ('x;y')
-- only a comment at the end;
"""
    out = split_statements(sql)
    assert len(out) == 3
    assert "CREATE TABLE t (a TEXT DEFAULT ';', b TEXT);" in out[0]
    assert "CREATE INDEX i ON t (a);" in out[1]
    assert out[2].startswith("INSERT INTO t (a) VALUES ('x;y')")
    conn = sqlite3.connect(":memory:")
    for statement in out:
        conn.execute(statement)
    assert conn.execute("SELECT a FROM t").fetchall() == [("x;y",)]


def test_split_statements_of_comments_only_is_empty() -> None:
    assert split_statements("-- nothing here;\n\n-- at all\n") == []


# --- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def empty_pg(pg_server: str) -> Iterator[str]:
    """A brand-new, empty PostgreSQL database (not cloned from the migrated template)."""
    name = f"sluice_mig_{os.getpid()}_{threading.get_ident() % 100_000}_{os.urandom(3).hex()}"
    admin = psycopg2.connect(libpq_dsn(pg_server))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pg_tables(url: str) -> set[str]:
    conn = psycopg2.connect(libpq_dsn(url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def pg_versions(url: str) -> list[str]:
    conn = psycopg2.connect(libpq_dsn(url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version FROM sluice_migrations ORDER BY version")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def apply_files_directly(url: str, files: list[Path], times: int) -> None:
    conn = psycopg2.connect(libpq_dsn(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for _ in range(times):
                for file in files:
                    for statement in split_statements(file.read_text()):
                        cur.execute(statement)
    finally:
        conn.close()


def test_migrated_database_has_nothing_to_apply(pg_url: str) -> None:
    assert migrate_postgres(pg_url) == []
    assert pg_versions(pg_url) == versions("postgres")
    assert pg_tables(pg_url) >= TABLES


def test_migrate_postgres_on_an_empty_database_applies_all(empty_pg: str) -> None:
    assert pg_tables(empty_pg) == set()
    assert migrate_postgres(empty_pg) == versions("postgres")
    assert pg_tables(empty_pg) >= TABLES
    assert migrate_postgres(empty_pg) == []
    assert pg_versions(empty_pg) == versions("postgres")


def test_concurrent_postgres_migrations_both_succeed_once(empty_pg: str) -> None:
    results, errors = run_concurrently(lambda: migrate_postgres(empty_pg), 2)
    assert errors == []
    assert sorted(v for r in results for v in r) == versions("postgres")
    assert pg_versions(empty_pg) == versions("postgres")


def test_postgres_schema_files_apply_twice_on_a_fresh_database(empty_pg: str) -> None:
    apply_files_directly(empty_pg, POSTGRES_FILES, times=2)
    assert pg_tables(empty_pg) >= TABLES - {"sluice_migrations"}


def test_postgres_schema_files_apply_again_on_a_migrated_database(pg_url: str) -> None:
    apply_files_directly(pg_url, POSTGRES_FILES, times=1)
    assert migrate_postgres(pg_url) == []


def test_postgres_idempotency_key_is_unique(pg_url: str) -> None:
    conn = psycopg2.connect(libpq_dsn(pg_url))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'usage_events'"
                " AND indexname = 'idx_usage_events_idempotency_key'"
            )
            (indexdef,) = cur.fetchone() or ("",)
    finally:
        conn.close()
    assert indexdef.startswith("CREATE UNIQUE INDEX")
    assert indexdef.endswith("(idempotency_key)")


# --- D1 compatibility, statically (tests/shared/test_wrangler.py runs the real wrangler)

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRINGS = re.compile(r"'(?:[^']|'')*'")
_FORBIDDEN = re.compile(r"\b(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|ATTACH|DETACH|PRAGMA)\b", re.I)


def code_of(statement: str) -> str:
    """The statement without comments and string literals (they may mention anything)."""
    return _STRINGS.sub("''", _COMMENTS.sub(" ", statement))


@pytest.mark.parametrize("file", D1_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_schema_file_is_d1_compatible(tmp_path: Path, file: Path) -> None:
    statements = split_statements(file.read_text())
    for statement in statements:
        code = code_of(statement)
        is_trigger = re.match(r"\s*CREATE\s+(TEMP\w*\s+)?TRIGGER\b", code, re.I)
        forbidden = [
            m for m in _FORBIDDEN.findall(code) if not (is_trigger and m.upper() == "BEGIN")
        ]
        assert forbidden == [], f"{file.name}: D1 refuses {forbidden} in {statement[:80]!r}"
        assert not re.search(r"(?<![\w$])[\"`\[]?_cf_", code, re.I), (
            f"{file.name}: _cf_ names are reserved by D1: {statement[:80]!r}"
        )
        assert len(statement.encode()) < 100_000, f"{file.name}: statement over D1's 100 KB"

    conn = sqlite3.connect(tmp_path / "d1.sqlite", isolation_level=None)
    try:
        apply_earlier(conn, file)
        for statement in statements:
            conn.execute(statement)
        names = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
        for kind, name in names:
            assert not name.lower().startswith("_cf_"), (kind, name)
        for table in sqlite_tables(conn):
            columns = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
            assert len(columns) <= 100, f"{table}: {len(columns)} columns (D1 allows 100)"
            for column in columns:
                assert not column[1].lower().startswith("_cf_"), (table, column[1])
    finally:
        conn.close()


def test_idempotency_key_unique_index_is_used_after_migration(tmp_path: Path) -> None:
    path = tmp_path / "sink.sqlite"
    migrate_sqlite(path)
    conn = sqlite3.connect(path)
    try:
        unique = {
            name: [r[2] for r in conn.execute(f'PRAGMA index_info("{name}")')]
            for _, name, is_unique, *_ in conn.execute("PRAGMA index_list(usage_events)")
            if is_unique
        }
        assert unique.get("idx_usage_events_idempotency_key") == ["idempotency_key"], unique
        plan = " ".join(
            r[3]
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id, metric_value FROM usage_events"
                " WHERE idempotency_key = ?",
                ("key-1",),
            )
        )
        assert "USING INDEX idx_usage_events_idempotency_key" in plan, plan
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            for i in range(2):
                conn.execute(
                    "INSERT INTO usage_events (id, organisation_id, idempotency_key, metric_name,"
                    " metric_value, \"timestamp\") VALUES (?, 'o', 'same-key', 'm', 1.0, 't')",
                    (f"evt-{i}",),
                )
    finally:
        conn.close()


def test_d1_source_read_uses_the_unprocessed_index(tmp_path: Path) -> None:
    """The D1 source pages through `processed_at IS NULL` rows in rowid order without sorting."""
    conn = sqlite3.connect(tmp_path / "d1.sqlite", isolation_level=None)
    try:
        for file in sorted((SCHEMA_DIR / "d1_source").glob("*.sql")):
            for statement in split_statements(file.read_text()):
                conn.execute(statement)
        plan = " ".join(
            r[3]
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT rowid, id FROM usage_events WHERE processed_at IS NULL"
                " AND rowid > ? ORDER BY rowid LIMIT ?",
                (0, 1000),
            )
        )
        assert "idx_usage_events_unprocessed" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
        # Repeated idempotency keys are allowed in the hot store: the sinks dedupe them.
        for i in range(2):
            conn.execute(
                "INSERT INTO usage_events (id, idempotency_key) VALUES (?, 'same-key')",
                (f"evt-{i}",),
            )
    finally:
        conn.close()


# --- helpers -------------------------------------------------------------------------------------


def run_concurrently(
    fn: Callable[[], list[str]], n: int
) -> tuple[list[list[str]], list[BaseException]]:
    """Call fn in n threads released together; their results and exceptions."""
    barrier = threading.Barrier(n)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            out = fn()
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(out)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a migration hung"
    return results, errors

"""Apply the SQL files of schema/<dialect>/ in order, once each, recording versions.

The files themselves hold no transaction statements (D1 refuses them); the runner wraps each file
in one transaction with its version row, so a failed file leaves nothing half applied. Concurrent
runs are serialised (an advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite; on a remote D1 the
version row's primary key makes the loser's batch roll back).
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg2

from sluice.shared.cloudflare import D1Client
from sluice.shared.database import libpq_dsn, sqlite_connect
from sluice.shared.errors import D1Error, SluiceError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
_VERSION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_ID = 7_431_001  # arbitrary, constant: the advisory lock taken by `sluice migrate`


class MigrationError(SluiceError):
    pass


def migration_files(dialect: str) -> list[tuple[str, Path]]:
    files = []
    for path in sorted((SCHEMA_DIR / dialect).glob("*.sql")):
        m = _VERSION.match(path.name)
        if not m:
            raise MigrationError(f"schema file name must look like 0001_name.sql: {path.name}")
        files.append((path.stem, path))
    return files


def migrate_postgres(url: str) -> list[str]:
    applied: list[str] = []
    conn = psycopg2.connect(libpq_dsn(url))
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS sluice_migrations ("
                " version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT version FROM sluice_migrations")
            done = {r[0] for r in cur.fetchall()}
            for version, path in migration_files("postgres"):
                if version in done:
                    continue
                try:
                    cur.execute(path.read_text())
                except psycopg2.Error as exc:
                    raise MigrationError(
                        f"{path.name} failed: {exc}".strip(), sink="postgres"
                    ) from exc
                cur.execute("INSERT INTO sluice_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
    finally:
        conn.close()
    return applied


def migrate_sqlite(path: Path) -> list[str]:
    applied: list[str] = []
    conn = sqlite_connect(path)
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sluice_migrations (version TEXT PRIMARY KEY,"
            " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
        )
        for version, file in migration_files("sqlite"):
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute(
                    "SELECT 1 FROM sluice_migrations WHERE version = ?", (version,)
                ).fetchone():
                    conn.execute("ROLLBACK")
                    continue
                for statement in split_statements(file.read_text()):
                    conn.execute(statement)
                conn.execute("INSERT INTO sluice_migrations (version) VALUES (?)", (version,))
                conn.execute("COMMIT")
            except Exception as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise MigrationError(f"{file.name} failed: {exc}", sink="sqlite") from exc
            applied.append(version)
    finally:
        conn.close()
    return applied


def migrate_d1(client: D1Client) -> list[str]:
    """Apply schema/sqlite/ to a remote D1 database through its REST API.

    Same bookkeeping as migrate_sqlite: a `sluice_migrations` row per file, written in the same D1
    batch (one transaction) as the file's statements. The version row is a plain INSERT, so if two
    runs race, the second one's batch fails on it and rolls back; the version is then there."""
    applied: list[str] = []
    try:
        client.query(
            "CREATE TABLE IF NOT EXISTS sluice_migrations (version TEXT PRIMARY KEY,"
            " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
        )
        done = {str(r["version"]) for r in client.query("SELECT version FROM sluice_migrations")}
    except D1Error as exc:
        raise MigrationError(f"cannot read sluice_migrations: {exc.message}", sink="d1") from exc
    for version, file in migration_files("sqlite"):
        if version in done:
            continue
        batch: list[tuple[str, list[object]]] = [
            (statement, []) for statement in split_statements(file.read_text())
        ]
        batch.append(("INSERT INTO sluice_migrations (version) VALUES (?)", [version]))
        try:
            client.batch(batch)
        except D1Error as exc:
            if "sluice_migrations" in exc.message and client.query(
                "SELECT 1 AS found FROM sluice_migrations WHERE version = ?", [version]
            ):
                continue  # applied by a concurrent run
            raise MigrationError(f"{file.name} failed: {exc.message}", sink="d1") from exc
        applied.append(version)
    return applied


def split_statements(sql: str) -> list[str]:
    """Split a schema file into statements with sqlite3.complete_statement (quotes, comments)."""
    import sqlite3

    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            stmt = buf.strip()
            if stmt and not all(
                ln.strip().startswith("--") or not ln.strip() for ln in stmt.splitlines()
            ):
                out.append(stmt)
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        out.append(buf.strip())
    return out

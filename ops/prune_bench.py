"""Time `sluice prune` of a large local D1 table, and prove it lost nothing.

    python -m sluice.ops.prune_bench --rows 1000000 --dir /tmp/prune-bench \\
        --postgres postgresql://postgres@127.0.0.1:5432/sluice_prune_bench

Builds the sample D1 file (ops/sample.py) with every row processed long ago, loads the valid
rows into both sinks (PostgreSQL and a SQLite file) as the pipeline would have written them,
less `--lacking` keys taken out of the SQLite sink (a sink restored from an older backup), then
runs the D1 prune and compares: every row deleted from D1 must have its key in both sinks, and
every row whose key a sink lacks must still be in D1. The PostgreSQL database is created (or
emptied) first: point `--postgres` at a scratch database.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
from sqlalchemy.engine import make_url

from sluice.ops.prune import run_prune
from sluice.ops.sample import write_d1_file
from sluice.shared.database import libpq_dsn, quote
from sluice.shared.migrations import migrate_postgres, migrate_sqlite
from sluice.shared.records import Validator, dedupe
from sluice.shared.settings import Settings
from sluice.shared.streams import CATALOG

LONG_AGO = "2020-01-01T00:00:00.000Z"


def _fresh_database(url: str) -> None:
    u = make_url(url)
    admin = psycopg2.connect(libpq_dsn(u.set(database="postgres").render_as_string(False)))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {quote(str(u.database))} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {quote(str(u.database))}")
    admin.close()


def load_sinks(d1: Path, pg_url: str, sqlite_path: Path, lacking: int) -> set[str]:
    """The D1 file's valid rows written to both sinks (deduped on the key, as the sinks do);
    `lacking` random keys are then removed from the SQLite sink. Returns those keys."""
    stream = CATALOG["usage_events"]
    cols = ", ".join(quote(c) for c in stream.column_names)
    src = sqlite3.connect(d1)
    raw = src.execute(f"SELECT {cols} FROM usage_events ORDER BY rowid").fetchall()
    src.close()
    good, _ = Validator(stream).validate(stream.column_names, raw)
    rows = dedupe(stream, good)
    marks = ", ".join("?" for _ in stream.column_names)
    lite = sqlite3.connect(sqlite_path)
    lite.executemany(f"INSERT OR IGNORE INTO usage_events ({cols}) VALUES ({marks})", rows)
    lite.commit()
    pg = psycopg2.connect(libpq_dsn(pg_url))
    with pg, pg.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            f"INSERT INTO usage_events ({cols}) VALUES %s ON CONFLICT DO NOTHING",
            rows,
            page_size=10_000,
        )
    pg.close()
    key_at = stream.column_names.index("idempotency_key")
    gone = set(random.Random(7).sample(sorted({r[key_at] for r in rows}), lacking))
    lite.executemany("DELETE FROM usage_events WHERE idempotency_key = ?", [(k,) for k in gone])
    lite.commit()
    lite.close()
    return gone


def run(rows: int, workdir: Path, pg_url: str, lacking: int, batch_size: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    d1 = workdir / "d1.sqlite"
    sqlite_path = workdir / "sink.sqlite"
    sqlite_path.unlink(missing_ok=True)
    write_d1_file(d1, rows)
    conn = sqlite3.connect(d1)
    conn.execute("UPDATE usage_events SET processed_at = ?", (LONG_AGO,))
    conn.commit()
    conn.close()
    _fresh_database(pg_url)
    migrate_postgres(pg_url)
    migrate_sqlite(sqlite_path)
    missing = load_sinks(d1, pg_url, sqlite_path, lacking)
    config = workdir / "sluice.toml"
    config.write_text(
        f'[sources.d1]\nkind = "d1"\nstream = "usage_events"\npath = "{d1}"\n\n'
        f"[retention]\nd1_days = 1\nbatch_size = {batch_size}\n"
    )
    env = {
        "SLUICE_CONFIG": str(config),
        "SLUICE_POSTGRES_URL": pg_url,
        "SLUICE_SQLITE_PATH": str(sqlite_path),
        "SLUICE_DATA_DIR": str(workdir / "data"),
        "SLUICE_BROKER_URL": "redis://127.0.0.1:1/0",  # never used by a prune
    }
    settings = Settings.load(env)
    before = _d1_keys(d1)
    t0 = time.perf_counter()
    (result,) = run_prune(settings, only="d1")
    seconds = time.perf_counter() - t0
    after = _d1_keys(d1)
    held = _sink_keys(pg_url, sqlite_path)
    deleted = {i: k for i, k in before.items() if i not in after}
    lost = sum(1 for k in deleted.values() if k not in held)
    wrongly_kept = sum(1 for i, k in after.items() if k in held)
    return {
        "rows": rows,
        "batch_size": batch_size,
        "deleted": len(deleted),
        "reported_deleted": result.deleted,
        "kept": len(after),
        "kept_lacking_in_a_sink": sum(1 for k in after.values() if k in missing),
        "seconds": round(seconds, 2),
        "rows_per_second": round(len(deleted) / seconds) if seconds else None,
        "deleted_but_missing_from_a_sink": lost,
        "kept_though_every_sink_holds_it": wrongly_kept,
        "status": result.status,
    }


def _d1_keys(path: Path) -> dict[str, str | None]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT id, idempotency_key FROM usage_events").fetchall())
    finally:
        conn.close()


def _sink_keys(pg_url: str, sqlite_path: Path) -> set[str]:
    lite = sqlite3.connect(sqlite_path)
    lite_keys = {r[0] for r in lite.execute("SELECT idempotency_key FROM usage_events")}
    lite.close()
    pg = psycopg2.connect(libpq_dsn(pg_url))
    with pg.cursor() as cur:
        cur.execute("SELECT idempotency_key FROM usage_events")
        pg_keys = {r[0] for r in cur.fetchall()}
    pg.close()
    return lite_keys & pg_keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, required=True, help="Scratch folder for the files.")
    parser.add_argument("--postgres", required=True, help="A scratch PostgreSQL database URL.")
    parser.add_argument("--lacking", type=int, default=1000, help="Keys the SQLite sink lacks.")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(run(args.rows, args.dir, args.postgres, args.lacking, args.batch_size)))


if __name__ == "__main__":
    main()

"""`sluice demo`: the whole pipeline on one machine, offline, from a fresh clone.

Generates a D1 file of usage events, starts the embedded Redis and PostgreSQL (unless URLs are
set) and real worker processes, migrates, produces until the source is drained, waits for the
queues to empty, and reports what happened, from the sinks' own ingestion_runs tables.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from sluice.ops.sample import write_d1_file
from sluice.ops.status import total_depth
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.database import sqlite_connect
from sluice.shared.migrations import migrate_postgres, migrate_sqlite
from sluice.shared.settings import Settings

SOURCE = "demo_d1"


@dataclass
class DemoResult:
    fetched: int = 0
    inserted: int = 0
    # Records repeating a key already read. A sink counts most as duplicates; when an earlier
    # read of a key reaches it after a later one (parallel workers make that a matter of
    # timing), it keeps the earlier read and counts it as an update (`sinks`: the split).
    duplicates: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    records_per_second: float = 0.0
    sinks: dict[str, dict[str, int]] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)


def write_demo_config(data_dir: Path, d1_path: Path, page_size: int) -> Path:
    path = data_dir / "demo.toml"
    path.write_text(
        "# Written by `sluice demo`: one local D1 source feeding both sinks.\n"
        "[pipeline]\n"
        f"page_size = {page_size}\n\n"
        "[streams.usage_events]\n"
        'sinks = ["postgres", "sqlite"]\n\n'
        f"[sources.{SOURCE}]\n"
        'kind = "d1"\n'
        'stream = "usage_events"\n'
        'mode = "local"\n'
        f"path = {str(d1_path)!r}\n"
        f"batch_size = {page_size}\n"
        "max_batches = 10\n"
    )
    return path


def run_demo(
    records: int,
    data_dir: Path,
    workers: int,
    page_size: int = 1000,
    progress: Any = None,
    advance: Callable[[int, int, str], None] | None = None,
) -> DemoResult:
    """Run the demo; `progress` gets messages, `advance(done, total, "")` the records every
    sink has committed (read, less the pages still in flight)."""
    say = progress or (lambda _msg: None)
    count = advance or (lambda _done, _total, _line: None)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    d1_path = data_dir / "demo-d1.sqlite"
    sample = write_d1_file(d1_path, records)
    say(f"sample D1 file: {records} usage events ({sample.invalid} invalid) at {d1_path}")
    env = dict(os.environ)
    env["SLUICE_CONFIG"] = str(write_demo_config(data_dir, d1_path, page_size))
    env.setdefault("SLUICE_DATA_DIR", str(data_dir))
    settings = Settings.load(env)
    ctx = app.configure(settings)
    # Workers get the resolved URLs, so every process uses the same (embedded) servers.
    env["SLUICE_BROKER_URL"] = ctx.broker_url
    env["SLUICE_POSTGRES_URL"] = ctx.postgres_url
    say(f"broker: {_safe(ctx.broker_url)}; postgres: {_safe(ctx.postgres_url)}")
    migrate_postgres(ctx.postgres_url)
    migrate_sqlite(settings.sqlite_path)

    run_ids: list[str] = []
    result = DemoResult()
    with WorkerPool(env, data_dir / "logs", loglevel="WARNING") as pool:
        pool.start("postgres", ["ingest.postgres", "dead_letter", "progress"], workers)
        pool.start_sqlite_writer("sqlite")
        t0 = time.perf_counter()
        count(0, records, "")
        while True:
            # Done when a run made with nothing in flight finds nothing: a run made while pages
            # are in flight resumes after them, so it cannot tell whether all is read.
            idle = ctx.progress.in_flight(SOURCE) == 0 and total_depth(ctx.redis) == 0
            summary = run_source(ctx, SOURCE)
            if summary.status == "failed":
                raise RuntimeError(f"source run failed: {summary.error}")
            run_ids.append(summary.run_id)
            result.fetched += summary.records
            in_flight = ctx.progress.in_flight(SOURCE)
            count(max(0, result.fetched - in_flight * page_size), records, "")
            if summary.pages == 0:
                if idle:
                    break
                time.sleep(0.2)
        result.seconds = round(time.perf_counter() - t0, 2)
    result.records_per_second = round(result.fetched / result.seconds) if result.seconds else 0
    _collect(ctx.state, settings.sqlite_path, run_ids, result)
    result.data = {
        "postgres": _safe(ctx.postgres_url),
        "sqlite": str(settings.sqlite_path),
        "d1_source": str(d1_path),
        "worker_logs": str(data_dir / "logs"),
    }
    return result


def _collect(state: Any, sqlite_path: Path, run_ids: list[str], result: DemoResult) -> None:
    q = (
        "SELECT coalesce(sum(inserted), 0), coalesce(sum(duplicates), 0),"
        " coalesce(sum(updated), 0), coalesce(sum(invalid), 0) FROM ingestion_runs"
        " WHERE run_id IN ({})"
    )
    runs = ", ".join(f":r{i}" for i in range(len(run_ids)))
    params = {f"r{i}": r for i, r in enumerate(run_ids)}
    with state.read() as conn:
        ins, dup, upd, inv = conn.execute(text(q.format(runs)), params).one()
        # This run's letters only (earlier demos' may still be pending): those of its pages,
        # one per record (each sink that refused a record keeps a letter of it).
        dead = conn.execute(
            text(
                "SELECT count(DISTINCT record_hash) FROM failed_ingestions WHERE page_id IN"
                f" (SELECT page_id FROM ingestion_runs WHERE run_id IN ({runs}))"
            ),
            params,
        ).scalar_one()
    result.sinks["postgres"] = _counts(ins, dup, upd, inv)
    lite = sqlite_connect(sqlite_path)
    try:
        marks = ", ".join("?" for _ in run_ids)
        row = lite.execute(
            "SELECT coalesce(sum(inserted), 0), coalesce(sum(duplicates), 0),"
            " coalesce(sum(updated), 0), coalesce(sum(invalid), 0) FROM ingestion_runs"
            f" WHERE run_id IN ({marks})",
            run_ids,
        ).fetchone()
    finally:
        lite.close()
    result.sinks["sqlite"] = _counts(*row)
    # A record written to both sinks counts once.
    result.inserted = max(s["inserted"] for s in result.sinks.values())
    result.duplicates = max(s["duplicates"] + s["updated"] for s in result.sinks.values())
    result.dead_letters = int(dead)


def _counts(inserted: Any, duplicates: Any, updated: Any, invalid: Any) -> dict[str, int]:
    """A sink's sums of its ingestion_runs counts."""
    return {
        "inserted": int(inserted),
        "duplicates": int(duplicates),
        "updated": int(updated),
        "invalid": int(invalid),
    }


def _safe(url: str) -> str:
    """A URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def sqlite_count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])
    finally:
        conn.close()

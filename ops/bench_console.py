"""`sluice bench console`: the console's queries at scale.

Fills a fresh database (PostgreSQL through COPY, SQLite through one executemany transaction) with
N dead letters and N source runs shaped like a long-lived deployment's (error classes of very
different sizes, a few sources, most letters pending, times spread over a month), then times
what the console and `sluice dlq`/`sluice runs` ask: the first page of letters, a deep keyset
page, filtered pages (by error class, source, text), counts and groups; and run history queries
(first and deep pages, by source and status, latest per source) over many runs, as p50/p95.
"""

from __future__ import annotations

import hashlib
import io
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import text

from sluice.ops import dlq, runs
from sluice.shared.database import libpq_dsn, postgres_engine, sqlite_connect
from sluice.shared.letters import record_of_row
from sluice.shared.migrations import migrate_postgres, migrate_sqlite
from sluice.shared.state import StateStore, sqlite_engine

BENCH_DB = "sluice_console_bench"
TABLES = ("failed_ingestions", "source_runs")
# Error classes and their share of the letters: one dominant wave, a few steady ones, rare ones.
CLASSES = [
    ("ValidationError", 0.55),
    ("RejectedBySinkError", 0.25),
    ("ForeignKeyViolationError", 0.12),
    ("KvMappingError", 0.05),
    ("MessageError", 0.02),
    ("HttpSourceError", 0.009),
    ("UnstorableError", 0.001),
]
SOURCES = [f"source-{i:02d}" for i in range(20)]
STREAMS = ["usage_events", "historical_prices", "watchlists"]
RUN_STATUSES = [("ok", 0.90), ("failed", 0.05), ("skipped", 0.03), ("partial", 0.02)]
SPAN = timedelta(days=30)


@dataclass
class Timing:
    name: str
    ms: float  # the median of the timed repetitions
    rows: int  # what the query returned (rows of a page, a count, groups)


@dataclass
class StoreResult:
    store: str
    letters: int
    runs: int
    fill_seconds: float
    letter_queries: list[Timing] = field(default_factory=list)
    history_queries: int = 0
    history_p50_ms: float = 0.0
    history_p95_ms: float = 0.0
    history_max_ms: float = 0.0
    history_by_kind: dict[str, float] = field(default_factory=dict)  # p95 per query kind

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick(rng: random.Random, weighted: list[tuple[str, float]]) -> str:
    x, acc = rng.random(), 0.0
    for name, share in weighted:
        acc += share
        if x < acc:
            return name
    return weighted[-1][0]


def _letters(n: int, t0: datetime) -> Iterator[tuple[Any, ...]]:
    """(stream, sink, key, source, page, payload, class, message, attempts, status, replays,
    first, last, record, hash, order) for letter i, oldest first."""
    rng = random.Random(16)
    step = SPAN / max(n, 1)
    for i in range(n):
        at = t0 + step * i
        cls = _pick(rng, CLASSES)
        status = "pending" if rng.random() < 0.9 else rng.choice(("replayed", "discarded"))
        record = record_of_row(["id", "value"], [f"evt-{i:08d}", rng.random()])
        yield (
            STREAMS[i % 3],
            ("postgres", "sqlite", "source")[i % 3],
            f"evt-{i:08d}",
            SOURCES[rng.randrange(len(SOURCES))],
            f"page-{i // 500:06d}",
            f'{{"id": "evt-{i:08d}"}}',
            cls,
            f"{cls}: metric_value: not a number in row {i}",
            1 + (status != "pending"),
            status,
            int(status == "replayed"),
            at - timedelta(minutes=5),
            at,
            record,
            hashlib.sha256(record).hexdigest(),
            i,
        )


def _runs(n: int, t0: datetime) -> Iterator[tuple[Any, ...]]:
    """(run_id, source, stream, kind, started, finished, status, pages, records, error)."""
    rng = random.Random(61)
    step = SPAN / max(n, 1)
    for i in range(n):
        at = t0 + step * i
        status = _pick(rng, RUN_STATUSES)
        yield (
            uuid.UUID(int=rng.getrandbits(128)).hex,
            SOURCES[rng.randrange(len(SOURCES))],
            STREAMS[i % 3],
            "backfill" if rng.random() < 0.02 else "produce",
            at,
            at + timedelta(seconds=rng.uniform(0.1, 30)),
            status,
            rng.randrange(0, 20),
            rng.randrange(0, 20_000),
            "HTTP 503 from the API" if status == "failed" else None,
        )


LETTER_COLUMNS = (
    "stream, sink, record_key, source, page_id, payload, error_class, error_message, attempts,"
    " status, replay_count, first_failed_at, last_failed_at, record, record_hash, record_order"
)
RUN_COLUMNS = "run_id, source, stream, kind, started_at, finished_at, status, pages, records, error"


def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bytes):
        return "\\\\x" + value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _copy(cur: Any, table: str, columns: str, rows: Iterator[tuple[Any, ...]]) -> None:
    """COPY the rows in chunks (a chunk of text in memory at a time)."""
    while True:
        buf = io.StringIO()
        count = 0
        for row in rows:
            buf.write("\t".join(map(_copy_text, row)) + "\n")
            count += 1
            if count == 100_000:
                break
        if not count:
            return
        buf.seek(0)
        cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", buf)
        if count < 100_000:
            return


def fill_postgres(
    server_url: str, letters: int, n_runs: int, t0: datetime, database: str = BENCH_DB
) -> str:
    """A fresh, migrated database on the server, filled; its URL."""
    from sqlalchemy.engine import make_url

    admin = psycopg2.connect(libpq_dsn(server_url))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{database}"')
    admin.close()
    url = make_url(server_url).set(database=database).render_as_string(hide_password=False)
    migrate_postgres(url)
    conn = psycopg2.connect(libpq_dsn(url))
    with conn, conn.cursor() as cur:
        # Bulk load: the secondary indexes are built once after the rows, not row by row.
        cur.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s)"
            " AND indexname NOT IN (SELECT conname FROM pg_constraint)",
            (list(TABLES),),
        )
        indexes = cur.fetchall()
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        _copy(cur, "failed_ingestions", LETTER_COLUMNS, _letters(letters, t0))
        _copy(cur, "source_runs", RUN_COLUMNS, _runs(n_runs, t0))
        cur.execute("SET maintenance_work_mem = '256MB'")
        for _, definition in indexes:
            cur.execute(definition)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE failed_ingestions")
        cur.execute("VACUUM ANALYZE source_runs")
    conn.close()
    return url


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def fill_sqlite(path: Path, letters: int, n_runs: int, t0: datetime) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    migrate_sqlite(path)
    conn = sqlite_connect(path, 30_000, cache_mib=256)
    try:
        marks = ", ".join("?" * 16)
        # Bulk load: the secondary indexes are built once after the rows, not row by row.
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            f" AND tbl_name IN {TABLES}"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        with conn:
            conn.executemany(
                f"INSERT INTO failed_ingestions ({LETTER_COLUMNS}) VALUES ({marks})",
                (
                    tuple(_iso(v) if isinstance(v, datetime) else v for v in row)
                    for row in _letters(letters, t0)
                ),
            )
            conn.executemany(
                f"INSERT INTO source_runs ({RUN_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                (
                    tuple(_iso(v) if isinstance(v, datetime) else v for v in row)
                    for row in _runs(n_runs, t0)
                ),
            )
        for _, definition in indexes:
            conn.execute(definition)
        conn.execute("ANALYZE")
    finally:
        conn.close()


def _time(fn: Callable[[], Any], repeat: int = 5) -> tuple[float, Any]:
    """The median wall time in ms of `repeat` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2), out


def measure_letters(store: StateStore, letters: int) -> list[Timing]:
    # A deep page: after the id 90% of the way down the newest-first listing.
    deep = max(1, letters // 10)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("first page", lambda: dlq.page_letters(store, dlq.Filters(), 50).rows),
        (
            "deep keyset page (90% down)",
            lambda: dlq.page_letters(store, dlq.Filters(after_id=deep), 50).rows,
        ),
        (
            "page by class (55% of letters)",
            lambda: dlq.page_letters(store, dlq.Filters(error_class="ValidationError"), 50).rows,
        ),
        (
            "page by class (0.1% of letters)",
            lambda: dlq.page_letters(store, dlq.Filters(error_class="UnstorableError"), 50).rows,
        ),
        (
            "page by source",
            lambda: dlq.page_letters(store, dlq.Filters(source="source-07"), 50).rows,
        ),
        (
            "page by text (one key)",
            lambda: dlq.page_letters(store, dlq.Filters(text=f"evt-{letters // 3:08d}"), 50).rows,
        ),
        (
            "page by text (common)",
            lambda: dlq.page_letters(store, dlq.Filters(text="not a number"), 50).rows,
        ),
        ("count pending", lambda: [dlq.count_letters(store, dlq.Filters())]),
        (
            "count by class (dry run)",
            lambda: [dlq.count_letters(store, dlq.Filters(error_class="KvMappingError"))],
        ),
        ("groups of pending", lambda: dlq.error_groups(store, dlq.Filters())),
    ]
    out = []
    for name, fn in cases:
        ms, rows = _time(fn)
        n = rows[0] if name.startswith("count") else len(rows)
        out.append(Timing(name, ms, int(n)))
    return out


def measure_history(store: StateStore, queries: int, t0: datetime) -> dict[str, list[float]]:
    rng = random.Random(7)
    kinds: dict[str, Callable[[], Any]] = {
        "first page": lambda: runs.list_runs(store, runs.RunFilters()),
        "by source": lambda: runs.list_runs(store, runs.RunFilters(source=rng.choice(SOURCES))),
        "by status": lambda: runs.list_runs(store, runs.RunFilters(status="failed")),
        "by source and status": lambda: runs.list_runs(
            store, runs.RunFilters(source=rng.choice(SOURCES), status="failed")
        ),
        "by kind": lambda: runs.list_runs(store, runs.RunFilters(kind="backfill")),
        "deep page": lambda: runs.list_runs(
            store, runs.RunFilters(before=(t0 + SPAN * rng.random(), "f" * 32))
        ),
        "latest per source": lambda: runs.latest_runs(store),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for fn in kinds.values():
        fn()  # warm
    names = list(kinds)
    for i in range(queries):
        name = names[i % len(names)]
        t = time.perf_counter()
        kinds[name]()
        times[name].append((time.perf_counter() - t) * 1000)
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def run_console_bench(
    store_kind: str,
    letters: int,
    n_runs: int,
    queries: int,
    data_dir: Path,
    postgres_server: str,
    say: Callable[[str], None],
    database: str = BENCH_DB,
) -> StoreResult:
    t0 = datetime.now(UTC) - SPAN
    t = time.perf_counter()
    say(f"{store_kind}: filling {letters:,} dead letters and {n_runs:,} runs")
    if store_kind == "postgres":
        url = fill_postgres(postgres_server, letters, n_runs, t0, database)
        store = StateStore(postgres_engine(url))
    else:
        path = data_dir / "console-bench.sqlite"
        fill_sqlite(path, letters, n_runs, t0)
        store = StateStore(sqlite_engine(path, 30_000))
    result = StoreResult(store_kind, letters, n_runs, round(time.perf_counter() - t, 1))
    try:
        with store.read() as conn:  # what the queries see is what was filled
            assert conn.execute(text("SELECT count(*) FROM failed_ingestions")).scalar() == letters
        say(f"{store_kind}: timing dead-letter queries")
        result.letter_queries = measure_letters(store, letters)
        say(f"{store_kind}: timing {queries} run history queries")
        times = measure_history(store, queries, t0)
        every = [x for v in times.values() for x in v]
        result.history_queries = len(every)
        result.history_p50_ms = _pct(every, 0.50)
        result.history_p95_ms = _pct(every, 0.95)
        result.history_max_ms = round(max(every), 2)
        result.history_by_kind = {k: _pct(v, 0.95) for k, v in times.items()}
    finally:
        store.dispose()
    return result


def format_console_result(r: StoreResult) -> str:
    lines = [
        f"{r.store}: {r.letters:,} dead letters, {r.runs:,} runs (filled in {r.fill_seconds}s)",
        "  dead letters (median of 5):",
    ]
    lines += [f"    {t.name:<34}{t.ms:>9.2f} ms  ({t.rows:,})" for t in r.letter_queries]
    lines.append(
        f"  run history, {r.history_queries} queries: p50 {r.history_p50_ms} ms,"
        f" p95 {r.history_p95_ms} ms, max {r.history_max_ms} ms"
    )
    lines += [f"    p95 {k:<30}{v:>9.2f} ms" for k, v in r.history_by_kind.items()]
    return "\n".join(lines)

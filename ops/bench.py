"""`sluice bench`: how close the pipeline runs to the database's own limit, on the same data.

Every path is measured in this one process tree, on the same generated usage events (10% repeated
keys, realistic metadata), against its own embedded Redis and PostgreSQL in a bench data folder
(so a benchmark can never truncate a real database):

- limit:    the records written in-process straight to the sink by the fastest idempotent
            method (PostgreSQL: COPY → staging → INSERT … ON CONFLICT, 10,000 per transaction;
            SQLite: the sink's multi-row INSERTs, 10,000 per transaction), no queue: the
            ceiling here;
- pipeline: D1 file → producer → Redis → real worker processes → sink, from the first fetch
            to the last commit;
- naive:    one Celery task per record doing one INSERT … ON CONFLICT (PostgreSQL);
- dlt:      the same records loaded by dlt with write_disposition="merge" (optional extra).
Each figure is the median of --runs runs on a fresh table. ops/performance.md lists what each
figure means, the command behind it and the latest results.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg2

from sluice.ops.sample import COLUMNS, generate_rows, write_d1_file
from sluice.ops.status import total_depth
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn, sqlite_connect
from sluice.shared.embedded import ensure_postgres, ensure_redis, stop_services
from sluice.shared.migrations import migrate_postgres, migrate_sqlite
from sluice.shared.records import Validator, dedupe
from sluice.shared.settings import Settings
from sluice.shared.sinks import PageMeta
from sluice.shared.sinks.sqlite import SqliteSink
from sluice.shared.streams import USAGE_EVENTS

SOURCE = "bench_d1"
LIMIT_BATCH = 10_000
RERUN_SECONDS = 5  # how often the pipeline bench re-runs the source while pages are in flight
SINKS = ("postgres", "sqlite")  # the sinks a bench measures (the remote D1 bills each call)
POOLS = ("solo", "prefork", "threads")  # worker layouts: see Bench._start


@dataclass
class BenchResult:
    sink: str
    records: int
    runs: int
    limit_rps: float
    pipeline_rps: float
    naive_rps: float | None
    dlt_rps: float | None
    ratio_to_limit: float
    speedup_vs_naive: float | None
    speedup_vs_dlt: float | None
    worker_peak_rss_mb: float
    p99_page_ms: float
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    rss_by_worker_mb: dict[str, float] = field(default_factory=dict)  # peak over the runs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss(pid: int) -> int:
    """A process's peak resident memory in bytes: the kernel's high-water mark (VmHWM), so no
    thread has to sample it during the run: a sampler walking /proc takes CPU from the very
    pipeline it measures, which shares the machine's cores. Elsewhere than Linux: the current
    RSS."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def worker_peaks(pool: WorkerPool) -> dict[str, int]:
    """Peak RSS of any single process (main or pool child) of each worker, by worker name."""
    peaks: dict[str, int] = {}
    for p in list(pool.procs):
        name = pool.name_of(p.pid)
        try:
            pids = [p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))]
        except psutil.Error:
            pids = [p.pid]
        for pid in pids:
            peaks[name] = max(peaks.get(name, 0), peak_rss(pid))
    return peaks


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Bench:
    def __init__(
        self,
        sink: str,
        records: int,
        page_size: int,
        workers: int,
        data_dir: Path,
        say: Callable[[str], None],
        pool: str = "solo",
        prefill: int = 0,
    ) -> None:
        self.sink = sink
        self.pool = pool
        self.prefill = prefill
        self.rss_by_worker: dict[str, int] = {}  # of the last pipeline run
        self.records = records
        self.page_size = page_size
        self.workers = workers
        self.dir = data_dir.resolve()
        self.say = say
        self.dir.mkdir(parents=True, exist_ok=True)
        self.d1 = self.dir / "bench-d1.sqlite"
        self.sqlite_path = self.dir / "bench-sink.sqlite"
        self.redis_url = ensure_redis(self.dir)
        self.pg_url = ensure_postgres(self.dir)
        self._tune_postgres()
        migrate_postgres(self.pg_url)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        self.env.update(
            {
                "SLUICE_BROKER_URL": self.redis_url,
                "SLUICE_POSTGRES_URL": self.pg_url,
                "SLUICE_SQLITE_PATH": str(self.sqlite_path),
                "SLUICE_DATA_DIR": str(self.dir),
                "SLUICE_CONFIG": str(self._write_config()),
            }
        )
        self.ctx: Context = app.configure(Settings.load(self.env))

    @contextlib.contextmanager
    def _pg(self) -> Iterator[Any]:
        """A cursor on the bench's PostgreSQL, in autocommit mode; closed with its connection."""
        conn = psycopg2.connect(libpq_dsn(self.pg_url))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def _tune_postgres(self) -> None:
        """A PostgreSQL tuned for bulk loads: a 1 GB buffer cache, so the indexes of a 1M-row table
        stay in memory, and a WAL large enough that no checkpoint is forced in the middle of the
        load. Both the limit and the pipeline run on it, so their ratio compares like with like."""
        with self._pg() as cur:
            cur.execute("SHOW shared_buffers")
            restart = cur.fetchone()[0] != "1GB"
            cur.execute("ALTER SYSTEM SET shared_buffers = '1GB'")
            cur.execute("ALTER SYSTEM SET max_wal_size = '4GB'")
            cur.execute("SELECT pg_reload_conf()")
        if restart:
            stop_services(self.dir)
            self.redis_url = ensure_redis(self.dir)
            self.pg_url = ensure_postgres(self.dir)

    def _write_config(self) -> Path:
        path = self.dir / "bench.toml"
        path.write_text(
            "[pipeline]\n"
            f"page_size = {self.page_size}\n\n"
            "[streams.usage_events]\n"
            f'sinks = ["{self.sink}"]\n\n'
            f"[sources.{SOURCE}]\n"
            'kind = "d1"\nstream = "usage_events"\n'
            f"path = {str(self.d1)!r}\n"
            f"batch_size = {self.page_size}\n"
            "max_batches = 1000000\n"
        )
        return path

    # -- fresh state -----------------------------------------------------------------------
    def reset(self) -> None:
        with self._pg() as cur:
            cur.execute("TRUNCATE usage_events, ingestion_runs, source_runs, failed_ingestions")
            cur.execute("CHECKPOINT")
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.sqlite_path) + suffix).unlink(missing_ok=True)
        migrate_sqlite(self.sqlite_path)
        self.ctx.redis.flushdb()
        if self.prefill:
            self._prefill()

    def _prefill(self) -> None:
        """Put `prefill` rows in the sink's table before a run: keys spread over the whole key
        space like real ones (md5), so new keys land all over big indexes. Loaded without the
        indexes, which are then rebuilt (minutes, not the hour of random-key inserts)."""
        n = self.prefill
        self.say(f"prefilling {self.sink} with {n:,} rows")
        if self.sink == "postgres":
            with self._pg() as cur:
                cur.execute("SET maintenance_work_mem = '512MB'")
                # Our schema only: a dlt dataset of an older bench has a `usage_events` too.
                cur.execute(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
                    " AND tablename = 'usage_events' AND indexname <> 'usage_events_pkey'"
                )
                indexes = cur.fetchall()
                for name, _ in indexes:
                    cur.execute(f'DROP INDEX "{name}"')
                cur.execute("ALTER TABLE usage_events DROP CONSTRAINT usage_events_pkey")
                cur.execute(
                    "INSERT INTO usage_events (id, organisation_id, project_id, idempotency_key,"
                    ' metric_name, metric_value, unit, "timestamp", metadata)'
                    " SELECT md5('id' || g)::uuid::text, 'org_' || lpad((g %% 200)::text, 4, '0'),"
                    " 'proj_' || (g %% 2000), 'pre_' || md5('k' || g), 'api_calls', g %% 1000,"
                    " 'count', to_timestamp(1700000000 + g / 2.0),"
                    ' \'{"region":"eu-west","sdk":"py/1.4.2","host":"h001"}\'::jsonb'
                    " FROM generate_series(1, %s) g",
                    (n,),
                )
                cur.execute("ALTER TABLE usage_events ADD PRIMARY KEY (id)")
                for _, definition in indexes:
                    cur.execute(definition)
                cur.execute("VACUUM ANALYZE usage_events")
                cur.execute("CHECKPOINT")
            return
        lite = sqlite_connect(self.sqlite_path)
        indexes = lite.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'usage_events' AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            lite.execute(f'DROP INDEX "{name}"')
        # The primary key's own index stays: rows go in in its order, so it is built by appends.
        lite.execute(
            "INSERT INTO usage_events (id, organisation_id, project_id, idempotency_key,"
            ' metric_name, metric_value, unit, "timestamp", metadata)'
            " WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?)"
            " SELECT lower(hex(randomblob(16))) AS id, printf('org_%04d', i % 200),"
            " printf('proj_%d', i % 2000), 'pre_' || lower(hex(randomblob(12))), 'api_calls',"
            " i % 1000, 'count',"
            " strftime('%Y-%m-%dT%H:%M:%S+00:00', 1700000000 + i / 2, 'unixepoch'),"
            ' \'{"region":"eu-west","sdk":"py/1.4.2","host":"h001"}\' FROM g ORDER BY id',
            (n,),
        )
        for _, definition in indexes:
            lite.execute(definition)
        lite.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        lite.close()

    # -- limit ---------------------------------------------------------------------------
    def limit(self, rows: list[list[Any]]) -> float:
        """The fastest idempotent in-process write of pre-validated rows, no queue."""
        self.reset()
        stream = USAGE_EVENTS.with_settings(sinks=(self.sink,), conflict="ignore")
        # SQLite: a cache twice the writer's default; the ceiling is not held to its memory target.
        sink = (
            SqliteSink(self.sqlite_path, cache_mib=128)
            if self.sink == "sqlite"
            else self.ctx.sink("postgres")
        )
        started = datetime.now(UTC)

        def load() -> None:
            for i in range(0, len(rows), LIMIT_BATCH):
                batch = dedupe(stream, rows[i : i + LIMIT_BATCH])
                sink.write(
                    stream,
                    batch,
                    PageMeta(f"limit-{i}", "bench", "limit", len(batch), 0, 1, started),
                )

        seconds = _timed(load)
        sink.close()
        return len(rows) / seconds

    # -- pipeline ------------------------------------------------------------------------
    def pipeline(self) -> tuple[float, float]:
        """Records/s from first fetch to last commit and p99 page ms; the workers' peak RSS is
        left in `rss_by_worker`."""
        self.reset()
        sample = write_d1_file(self.d1, self.records)
        pool = WorkerPool(self.env, self.dir / "logs", loglevel="WARNING")
        if self.sink == "sqlite":
            # One writer process for the file, its threads sharing transactions (group commit,
            # shared/sinks/sqlite.py); dead letters and retried acknowledgements run beside it.
            pool.start_sqlite_writer("writer")
            self._start(pool, "aux", ["dead_letter", "progress"], 1)
        else:
            self._start(pool, "bench", ["ingest.postgres", "dead_letter", "progress"], self.workers)
        try:
            time.sleep(2)  # let the workers boot: measure the pipeline, not Python start-up
            t0 = time.time()
            self._drain()
            self.rss_by_worker = worker_peaks(pool)  # before the workers exit
        finally:
            pool.stop()
        self._check(len(sample.distinct_valid_keys))
        last_commit, p99 = self._commits()
        return self.records / (last_commit - t0), p99

    def _drain(self) -> None:
        """Run the source, and again while pages are in flight, until a run finds nothing."""
        s = run_source(self.ctx, SOURCE)
        rerun = time.monotonic() + RERUN_SECONDS
        while True:
            if s.status != "ok":
                raise RuntimeError(f"bench source run failed: {s.error}")
            # Two Redis reads per tick: a source run per tick (open, lock, history row) would
            # take CPU from the producer and workers it is measuring, on the same cores.
            idle = self.ctx.progress.in_flight(SOURCE) == 0
            if idle and total_depth(self.ctx.redis) == 0:
                s = run_source(self.ctx, SOURCE)  # anything left (a page presumed lost)?
                if s.pages == 0:
                    return
            elif time.monotonic() > rerun:
                s = run_source(self.ctx, SOURCE)
                rerun = time.monotonic() + RERUN_SECONDS
            else:
                time.sleep(0.05)

    def _start(
        self, pool: WorkerPool, name: str, queues: list[str], n: int, extra: Sequence[str] = ()
    ) -> None:
        """n workers on `queues`: one prefork (threads) worker with n pool processes (threads),
        or n single-process (solo) workers, which skip prefork's hand-off of every message from the
        consumer process to a pool process through a pipe (ops/performance.md)."""
        if self.pool != "solo":
            pool.start(name, queues, n, extra=["--pool", self.pool, *extra])
        else:
            for i in range(n):
                pool.start(f"{name}{i}", queues, 1, extra=["--pool", self.pool, *extra])

    def _check(self, expected: int) -> None:
        """A fast run counts only if it was exact: every distinct valid key in the sink once, and
        every D1 row marked processed."""
        if self.sink == "postgres":
            with self._pg() as cur:
                cur.execute("SELECT count(*) FROM usage_events")
                stored = int(cur.fetchone()[0])
        else:
            lite = sqlite_connect(self.sqlite_path)
            stored = int(lite.execute("SELECT count(*) FROM usage_events").fetchone()[0])
            lite.close()
        d1 = sqlite_connect(self.d1)
        unmarked = int(
            d1.execute("SELECT count(*) FROM usage_events WHERE processed_at IS NULL").fetchone()[0]
        )
        d1.close()
        if stored != expected + self.prefill or unmarked:
            raise RuntimeError(
                f"bench pipeline was not exact: {stored:,} rows in {self.sink} for"
                f" {expected + self.prefill:,} expected, {unmarked:,} D1 rows not marked"
            )

    def _commits(self) -> tuple[float, float]:
        """Time of the last commit (epoch s) and the p99 page latency (ms) in the sink."""
        if self.sink == "postgres":
            with self._pg() as cur:
                cur.execute(
                    "SELECT extract(epoch FROM max(committed_at)), percentile_cont(0.99) WITHIN"
                    " GROUP (ORDER BY extract(epoch FROM committed_at - started_at) * 1000)"
                    " FROM ingestion_runs"
                )
                last, p99 = cur.fetchone()
            return float(last), float(p99)
        lite = sqlite_connect(self.sqlite_path)
        rows = lite.execute("SELECT started_at, committed_at FROM ingestion_runs").fetchall()
        lite.close()
        ends = [datetime.fromisoformat(c) for _, c in rows]
        lat = sorted(
            (datetime.fromisoformat(c) - datetime.fromisoformat(s)).total_seconds() * 1000
            for s, c in rows
        )
        return max(ends).timestamp(), lat[int(0.99 * (len(lat) - 1))]

    # -- naive ---------------------------------------------------------------------------
    def naive(self, rows: list[list[Any]]) -> float:
        self.reset()
        distinct = len({r[3] for r in rows})
        pool = WorkerPool(self.env, self.dir / "logs", loglevel="WARNING")
        # The same worker processes as the pipeline gets: only the work per task differs.
        self._start(
            pool, "naive", ["naive"], self.workers, extra=["--include", "sluice.ops.bench_tasks"]
        )
        try:
            time.sleep(2)
            t0 = time.perf_counter()
            for r in rows:
                app.send_task("sluice.bench.naive_insert", args=[r], queue="naive")
            with self._pg() as cur:
                while True:
                    cur.execute("SELECT count(*) FROM usage_events")
                    if cur.fetchone()[0] >= distinct and self.ctx.redis.llen("naive") == 0:
                        break
                    time.sleep(0.05)
            return len(rows) / (time.perf_counter() - t0)
        finally:
            pool.stop()

    # -- dlt -----------------------------------------------------------------------------
    def dlt(self, rows: list[list[Any]]) -> float | None:
        try:
            import dlt
        except ImportError:
            return None
        os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
        self.reset()
        names = list(USAGE_EVENTS.column_names)
        dicts = [dict(zip(names, r, strict=True)) for r in rows]

        @dlt.resource(
            name="usage_events",
            write_disposition="merge",
            primary_key="idempotency_key",
        )
        def events() -> Any:
            for i in range(0, len(dicts), LIMIT_BATCH):
                yield dicts[i : i + LIMIT_BATCH]

        from sqlalchemy.engine import make_url

        # The embedded server is reached by its socket folder and port, both in the URL's query:
        # libpq takes them from the query of a connection URI, which dlt passes on unchanged.
        # dlt insists on a host: the socket folder in the query overrides it for libpq.
        u = make_url(self.pg_url)
        creds = u.set(
            drivername="postgresql", password=u.password or "unused", host=u.host or "localhost"
        ).render_as_string(hide_password=False)
        stamp = int(time.time())
        pipe = dlt.pipeline(
            pipeline_name=f"bench_{stamp}",
            destination=dlt.destinations.postgres(credentials=creds),
            dataset_name=f"dlt_{stamp}",
            pipelines_dir=str(self.dir),
        )
        try:
            seconds = _timed(lambda: pipe.run(events()))
        finally:
            # Each run's dataset held a copy of the records (and its staging schema): left in
            # place, they grew the bench's database run after run.
            with self._pg() as cur:
                for schema in (pipe.dataset_name, f"{pipe.dataset_name}_staging"):
                    cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            shutil.rmtree(Path(self.dir) / pipe.pipeline_name, ignore_errors=True)
        return len(rows) / seconds


def run_bench(
    sink: str,
    records: int,
    page_size: int,
    workers: int,
    runs: int,
    naive_records: int,
    data_dir: Path,
    say: Callable[[str], None],
    pool: str = "solo",
    prefill: int = 0,
    advance: Callable[[int, int, str], None] | None = None,
) -> BenchResult:
    """Measure `sink` `runs` times; `say` gets messages. `advance(done, total, line)`, when
    given, gets the measurements done so far with a line giving the last one, instead of
    `say`."""
    b = Bench(sink, records, page_size, workers, data_dir, say, pool, prefill)
    baselines = sink == "postgres" and not prefill  # naive and dlt run on PostgreSQL only
    total = runs * (2 + int(baselines and bool(naive_records)) + int(baselines))
    done = 0

    def measured(line: str) -> None:
        nonlocal done
        done += 1
        if advance is not None:
            advance(done, total, line)
        else:
            say(line)

    raw, _, _ = generate_rows(records)
    rows, _ = Validator(USAGE_EVENTS).validate(COLUMNS, [list(r) for r in raw])
    samples: dict[str, list[float]] = {"limit": [], "pipeline": [], "naive": [], "dlt": []}
    by_worker: dict[str, float] = {}  # MB, peak over the runs
    p99s: list[float] = []
    notes: list[str] = []
    for run in range(1, runs + 1):
        samples["limit"].append(b.limit(rows))
        measured(f"run {run}: limit {samples['limit'][-1]:,.0f} rows/s")
        rps, p99 = b.pipeline()
        samples["pipeline"].append(rps)
        rss = max(b.rss_by_worker.values(), default=0) / 2**20
        for name, peak in b.rss_by_worker.items():
            by_worker[name] = max(by_worker.get(name, 0.0), round(peak / 2**20, 1))
        p99s.append(p99)
        measured(
            f"run {run}: pipeline {rps:,.0f} records/s (worker peak {rss:.0f} MB, p99 page "
            f"{p99:.1f} ms)"
        )
        if baselines and naive_records:
            samples["naive"].append(b.naive(rows[:naive_records]))
            measured(f"run {run}: naive {samples['naive'][-1]:,.0f} records/s")
        d = b.dlt(rows) if baselines else None
        if d is not None:
            samples["dlt"].append(d)
        if baselines:
            measured(f"run {run}: dlt " + (f"{d:,.0f} records/s" if d is not None else "skipped"))
    if prefill:
        notes.append(f"{prefill:,} rows in the table before each run; naive and dlt skipped")
    elif sink != "postgres":
        notes.append("naive and dlt baselines are measured on PostgreSQL only")
    elif not samples["dlt"]:
        notes.append("dlt not installed (pip install -e '.[bench]'): peer baseline skipped")
    med = {k: statistics.median(v) if v else None for k, v in samples.items()}
    limit_rps, pipeline_rps = med["limit"] or 0.0, med["pipeline"] or 0.0
    return BenchResult(
        sink=sink,
        records=records,
        runs=runs,
        limit_rps=round(limit_rps),
        pipeline_rps=round(pipeline_rps),
        naive_rps=round(med["naive"]) if med["naive"] else None,
        dlt_rps=round(med["dlt"]) if med["dlt"] else None,
        ratio_to_limit=round(pipeline_rps / limit_rps, 3) if limit_rps else 0.0,
        speedup_vs_naive=round(pipeline_rps / med["naive"], 1) if med["naive"] else None,
        speedup_vs_dlt=round(pipeline_rps / med["dlt"], 2) if med["dlt"] else None,
        worker_peak_rss_mb=max(by_worker.values(), default=0.0),
        p99_page_ms=round(statistics.median(p99s), 1),
        notes=notes,
        samples={k: [round(x) for x in v] for k, v in samples.items() if v},
        rss_by_worker_mb=by_worker,
    )


def format_result(r: BenchResult) -> str:
    def f(x: float | None, unit: str = "") -> str:
        return "skipped" if x is None else f"{x:,.0f}{unit}"

    lines = [
        f"sluice bench — sink {r.sink}, {r.records:,} records, median of {r.runs} run(s)",
        f"  {'limit (in-process, no queue)':<34}{f(r.limit_rps):>12} records/s",
        f"  {'pipeline (D1 → Redis → workers)':<34}{f(r.pipeline_rps):>12} records/s"
        f"   ratio to limit {r.ratio_to_limit:.2f}",
        f"  {'naive (task per record)':<34}{f(r.naive_rps):>12} records/s"
        + (f"   speedup {r.speedup_vs_naive:.0f}x" if r.speedup_vs_naive else ""),
        f"  {'dlt merge':<34}{f(r.dlt_rps):>12} records/s"
        + (f"   speedup {r.speedup_vs_dlt:.1f}x" if r.speedup_vs_dlt else ""),
        f"  worker peak RSS {r.worker_peak_rss_mb:.0f} MB; p99 page {r.p99_page_ms:.1f} ms",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)

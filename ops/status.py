"""`sluice status`: gather the state of the pipeline into a StatusReport (ops/status_report.py
holds the report, its JSON document and its text).

- queues: depth as waiting (in the broker's list) + unacked (held by workers). Flower counts only
  the waiting part; a page a worker holds is still work to do. On RabbitMQ the waiting count
  comes from a passive `queue.declare`; unacked needs the management API, so it is unknown.
- dead letters pending, by stream, sink and error class (failed_ingestions).
- sources (every kind): last run (source_runs), last commit, pages in flight; and what the
  source's kind knows of itself (its `status()`: a local D1 table's rows not processed yet, an
  HTTP source's cursors, a KV migration), including how its lag is measured.
- workers online with their pool size (Celery remote control: `inspect().stats()`).

Every part is read on its own: a part that fails (PostgreSQL down, say) is reported under
`errors` and the others are still read.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from sluice.ops.prune_history import last_prunes
from sluice.ops.status_report import (
    DeadLetterGroup,
    LastRun,
    QueueDepth,
    SourceReport,
    StatusReport,
    WorkerReport,
    render_status,
)
from sluice.ops.workers import role_of
from sluice.producers.registry import open_source
from sluice.producers.source import SourceStatus
from sluice.shared.celery_app import QUEUES, ingest_queue
from sluice.shared.context import Context
from sluice.shared.database import postgres_engine, quote
from sluice.shared.errors import SluiceError
from sluice.shared.redis_client import open_redis
from sluice.shared.settings import SINK_NAMES, Settings
from sluice.shared.state import StateStore, sqlite_engine, state_kind
from sluice.shared.streams import Stream

__all__ = ["StatusReport", "collect_sources", "collect_status", "render_status"]

CONNECT_TIMEOUT = 5  # seconds; operator tools must answer even when a server is unreachable
FUTURE_SLACK = timedelta(minutes=1)  # clocks of sources and sinks may differ this much

T = TypeVar("T")


# -- queues ------------------------------------------------------------------------------------


def queue_depths(client: redis.Redis, queues: Sequence[str] = QUEUES) -> dict[str, dict[str, int]]:
    """Redis broker: LLEN of each queue + its messages in kombu's `unacked` hash."""
    unacked: Counter[str] = Counter()
    for raw in client.hvals("unacked"):
        try:
            _, _, routing_key = json.loads(raw)
            unacked[str(routing_key)] += 1
        except (ValueError, TypeError):
            unacked["?"] += 1
    out = {}
    for q in queues:
        waiting = int(client.llen(q))
        out[q] = {"waiting": waiting, "unacked": unacked[q], "total": waiting + unacked[q]}
    return out


def total_depth(client: redis.Redis) -> int:
    return sum(d["total"] for d in queue_depths(client).values())


def amqp_queue_depths(
    url: str, queues: Sequence[str] = QUEUES, timeout: float = CONNECT_TIMEOUT
) -> dict[str, dict[str, int | None]]:
    """RabbitMQ: messages ready in each queue (passive declare: creates nothing). A queue that
    was never declared holds nothing. Unacked messages are only visible through the management
    API, so they are reported as unknown (None)."""
    from kombu import Connection

    out: dict[str, dict[str, int | None]] = {}
    with Connection(url, connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1)
        for q in queues:
            channel = conn.channel()
            try:
                _, waiting, _ = channel.queue_declare(queue=q, passive=True)
            except conn.channel_errors:  # 404 NOT_FOUND (the server closes the channel)
                waiting = 0
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
            out[q] = {"waiting": int(waiting), "unacked": None, "total": int(waiting)}
    return out


def broker_kind(url: str) -> str:
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme in ("redis", "rediss", "unix", "sentinel"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    return scheme


def _depths(found: Mapping[str, Mapping[str, int | None]]) -> dict[str, QueueDepth]:
    return {
        q: QueueDepth(waiting=d["waiting"] or 0, unacked=d["unacked"], total=d["total"] or 0)
        for q, d in found.items()
    }


def broker_queue_depths(ctx: Context) -> dict[str, QueueDepth]:
    url = ctx.broker_url
    kind = broker_kind(url)
    if kind == "amqp":
        return _depths(amqp_queue_depths(url))
    if kind != "redis":
        raise SluiceError(f"queue depths: unsupported broker {kind!r} (redis or amqp)")
    tracking = ctx.settings.env.get("SLUICE_REDIS_URL")
    if not tracking or tracking == url:
        return _depths(queue_depths(ctx.redis))
    client = open_redis(
        url, ctx.settings.broker_master, socket_timeout=10, socket_connect_timeout=CONNECT_TIMEOUT
    )
    try:
        return _depths(queue_depths(client))
    finally:
        client.close()


# -- databases ---------------------------------------------------------------------------------


def ops_engine(url: str) -> Engine:
    """A PostgreSQL engine that gives up connecting after CONNECT_TIMEOUT seconds."""
    u = make_url(url).update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT)})
    return postgres_engine(u.render_as_string(hide_password=False))


def sqlite_reader(path: Path) -> sqlite3.Connection:
    """Open an existing SQLite file without creating it (a missing file is an error)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=CONNECT_TIMEOUT)
    conn.execute(f"PRAGMA busy_timeout={CONNECT_TIMEOUT * 1000}")
    return conn


def time_column(stream: Stream) -> str | None:
    """The stream's event time: its first timestamp column."""
    return next((c.name for c in stream.columns if c.type == "timestamp"), None)


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def uses_postgres(settings: Settings) -> bool:
    """Whether the deployment has PostgreSQL at all: a stream writes there, or the state store
    is there. (A SQLite-only deployment must not start, nor wait for, a PostgreSQL.)"""
    return "postgres" in settings.sinks_fed or state_kind(settings) == "postgres"


def ops_state(settings: Settings, pg: Engine | None) -> StateStore:
    """The state store for operator tools: over `pg` (its connect timeout) when it is in
    PostgreSQL, else the SQLite file."""
    if state_kind(settings) == "postgres":
        assert pg is not None
        return StateStore(pg)
    return StateStore(sqlite_engine(settings.sqlite_path, CONNECT_TIMEOUT * 1000))


def dead_letters_pending(store: StateStore) -> list[DeadLetterGroup]:
    """Pending dead letters by stream, sink and error class (uses the (status, stream,
    error_class) index)."""
    with store.read() as conn:
        rows = conn.execute(
            text(
                "SELECT stream, sink, error_class, count(*), min(first_failed_at),"
                " max(last_failed_at) FROM failed_ingestions WHERE status = 'pending'"
                " GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3"
            )
        ).all()
    return [
        DeadLetterGroup(
            stream=r[0],
            sink=r[1],
            error_class=r[2],
            count=int(r[3]),
            oldest=_as_utc(r[4]),
            newest=_as_utc(r[5]),
        )
        for r in rows
    ]


def _primary_sink(stream: Stream) -> str:
    """Where status reads a stream's progress: PostgreSQL, else the SQLite file, else the remote
    D1 (last: each read there is an API call, billed as rows read)."""
    for sink in ("postgres", "sqlite", "d1"):
        if sink in stream.sinks:
            return sink
    return "postgres"


def _d1_scalar(ctx: Context, sql: str, params: list[object]) -> Any:
    from sluice.shared.sinks.d1 import D1Sink

    sink = ctx.sink("d1")
    assert isinstance(sink, D1Sink)
    rows = sink.client().query(sql, params)
    return next(iter(rows[0].values())) if rows else None


def newest_record_time(ctx: Context, engine: Engine | None, stream: Stream) -> datetime | None:
    """The newest event time committed for the stream, in its primary sink (PostgreSQL when the
    stream goes there). Cost: max() over the time column; without an index on that column alone
    this scans the table (add one when the table is large and you scrape often)."""
    col = time_column(stream)
    if col is None:
        return None
    sql = f"SELECT max({quote(col)}) FROM {quote(stream.table)}"
    if _primary_sink(stream) == "postgres":
        assert engine is not None
        with engine.connect() as conn:
            return _as_utc(conn.execute(text(sql)).scalar())
    if _primary_sink(stream) == "d1":
        return _as_utc(_d1_scalar(ctx, sql, []))
    lite = sqlite_reader(ctx.settings.sqlite_path)
    try:
        return _as_utc(lite.execute(sql).fetchone()[0])
    finally:
        lite.close()


def last_commit(
    ctx: Context, engine: Engine | None, stream: Stream, source: str
) -> datetime | None:
    """When a page of this source was last committed (ingestion_runs, primary sink)."""
    if _primary_sink(stream) == "postgres":
        assert engine is not None
        with engine.connect() as conn:
            return _as_utc(
                conn.execute(
                    text(
                        "SELECT max(committed_at) FROM ingestion_runs"
                        " WHERE stream = :stream AND source = :source"
                    ),
                    {"stream": stream.name, "source": source},
                ).scalar()
            )
    if _primary_sink(stream) == "d1":
        return _as_utc(
            _d1_scalar(
                ctx,
                "SELECT max(committed_at) AS t FROM ingestion_runs WHERE stream = ? AND source = ?",
                [stream.name, source],
            )
        )
    lite = sqlite_reader(ctx.settings.sqlite_path)
    try:
        row = lite.execute(
            "SELECT max(committed_at) FROM ingestion_runs WHERE stream = ? AND source = ?",
            (stream.name, source),
        ).fetchone()
        return _as_utc(row[0])
    finally:
        lite.close()


def cursor_lag(now: datetime, cursors: dict[str, datetime] | None) -> float | None:
    """Now minus the cursor of the partition furthest behind (None without a cursor)."""
    if not cursors:
        return None
    return round((now - min(cursors.values())).total_seconds(), 1)


def last_run(store: StateStore, source: str) -> LastRun | None:
    day_ago = store.ts(datetime.now(UTC) - timedelta(hours=24))
    with store.read() as conn:
        r = conn.execute(
            text(
                "SELECT run_id, status, pages, records, started_at, finished_at, error"
                " FROM source_runs WHERE source = :s ORDER BY started_at DESC LIMIT 1"
            ),
            {"s": source},
        ).first()
        failed = conn.execute(
            text(
                "SELECT count(*) FROM source_runs WHERE source = :s AND status = 'failed'"
                " AND started_at > :since"
            ),
            {"s": source, "since": day_ago},
        ).scalar()
    if r is None:
        return None
    started, finished = _as_utc(r[4]), _as_utc(r[5])
    return LastRun(
        run_id=str(r[0]),
        status=str(r[1]),
        pages=int(r[2]),
        records=int(r[3]),
        started_at=started,
        seconds=round((finished - started).total_seconds(), 3) if started and finished else None,
        error=r[6],
        failed_last_24h=int(failed or 0),
    )


def _part(errors: dict[str, str], name: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}".strip()
        return None


def _seconds_since(now: datetime, then: datetime | None) -> float | None:
    """Seconds from `then` to `now`, never negative: a time in the future (a source's clock
    ahead, a wrong time zone) is reported by `future_times`, not as a negative lag."""
    return round(max(0.0, (now - then).total_seconds()), 1) if then else None


# -- sources -----------------------------------------------------------------------------------


def _in_flight(ctx: Context, source: str) -> tuple[int, float | None]:
    return ctx.progress.in_flight_age(source)


def source_status(settings: Settings, name: str, state: StateStore | None) -> SourceStatus:
    """What the source's kind knows of itself (its `status()`), read with `state`."""
    source = open_source(settings, name)
    try:
        return source.status(state)
    finally:
        source.close()


def collect_sources(
    ctx: Context,
    pg: Engine | None,
    store: StateStore | None,
    errors: dict[str, str],
    *,
    runs: bool = True,
    lag: bool = True,
) -> dict[str, SourceReport]:
    """Each configured source, of every kind, by name. `pg` is None when PostgreSQL is
    unreachable (or not used), `store` when the state store is: what lives there (runs,
    cursors, and lag and commit when the stream goes to PostgreSQL) is then unknown (None).
    `runs=False` leaves out each source's last run (the metrics count runs themselves);
    `lag=False` the newest event time of each stream (a max() over its table).

    What cannot be read of one source is kept with it (`SourceReport.errors`), so one source
    that cannot be opened leaves the others; `errors` gets what belongs to a stream. Each
    source's backlog age is what its kind says of its oldest item still to process.

    Lag is measured as the source's kind says: for a source that owns its stream (D1), now
    minus the newest event time committed for the stream; for one that shares it (HTTP), now
    minus its own partition cursor furthest behind."""
    now = datetime.now(UTC)
    newest: dict[str, datetime | None] = {}  # per stream
    out: dict[str, SourceReport] = {}
    for name, cfg in sorted(ctx.settings.sources.items()):
        stream = ctx.settings.stream(cfg.stream)
        in_sink = pg is not None or _primary_sink(stream) != "postgres"
        report = SourceReport(name=name, kind=cfg.kind, stream=stream.name)
        if in_sink:
            report.last_commit = _part(
                report.errors, "commit", partial(last_commit, ctx, pg, stream, name)
            )
            report.last_commit_seconds_ago = _seconds_since(now, report.last_commit)
        in_flight = _part(report.errors, "in_flight", partial(_in_flight, ctx, name))
        if in_flight is not None:
            count, age = in_flight
            report.pages_in_flight = count
            report.oldest_in_flight_seconds = round(age, 1) if age is not None else None
        own = _part(report.errors, "source", partial(source_status, ctx.settings, name, store))
        if own is not None:
            report.own = own
            report.errors.update(own.errors)
            report.backlog_age_seconds = own.backlog_age(now)
            if own.lag_from == "stream" and lag:
                if stream.name not in newest:  # sources of one stream read it once
                    newest[stream.name] = (
                        _part(
                            errors,
                            f"lag:{stream.name}",
                            partial(newest_record_time, ctx, pg, stream),
                        )
                        if in_sink
                        else None
                    )
                t = report.newest_record = newest[stream.name]
                report.lag_seconds = _seconds_since(now, t)
                if t is not None and t > now + FUTURE_SLACK:
                    report.future_times = f"newest event time {t.isoformat()} is in the future"
            elif own.lag_from == "cursors":
                report.lag_seconds = cursor_lag(now, own.cursors)
        if runs and store is not None:
            report.last_run = _part(report.errors, "last_run", partial(last_run, store, name))
        out[name] = report
    return out


# -- workers -----------------------------------------------------------------------------------


def pool_size(stats: dict[str, Any]) -> int | None:
    """A worker's current pool size. `max-concurrency` is the size it started with (pool_grow
    and pool_shrink do not update it); the prefork pool's process list is the live size."""
    pool = stats.get("pool") or {}
    procs = pool.get("processes")
    if isinstance(procs, list):
        return len(procs)
    value = pool.get("max-concurrency")
    return int(value) if isinstance(value, int) else None


def _inspect(app: Any, timeout: float = 1.0, nodes: Sequence[str] | None = None) -> Any:
    return app.control.inspect(timeout=timeout, destination=list(nodes) if nodes else None)


def workers_online(
    app: Any, timeout: float = 1.0, nodes: Sequence[str] | None = None
) -> dict[str, WorkerReport]:
    """Workers answering remote control within `timeout`, with pool size and queues. The two
    broadcasts run side by side, so this takes about `timeout` seconds."""
    with ThreadPoolExecutor(2) as pool:
        f_stats = pool.submit(lambda: _inspect(app, timeout, nodes).stats() or {})
        f_queues = pool.submit(lambda: _inspect(app, timeout, nodes).active_queues() or {})
        stats: dict[str, Any] = f_stats.result()
        queues: dict[str, Any] = f_queues.result()
    out: dict[str, WorkerReport] = {}
    for node, st in sorted(stats.items()):
        pool_info = st.get("pool") or {}
        auto = st.get("autoscaler")
        out[node] = WorkerReport(
            concurrency=pool_size(st),
            max_concurrency=pool_info.get("max-concurrency"),
            autoscale=(auto.get("min"), auto.get("max")) if auto else None,
            pool=pool_info.get("implementation"),
            queues=sorted(q.get("name", "?") for q in queues.get(node) or []),
            pid=st.get("pid"),
            uptime_seconds=st.get("uptime"),
            tasks=sum((st.get("total") or {}).values()),
            role=role_of(node),
        )
    return out


# -- the whole screen --------------------------------------------------------------------------


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _ping_sqlite(path: Path) -> None:
    conn = sqlite_reader(path)  # never creates the file
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    finally:
        conn.close()


def queues_needed(settings: Settings) -> list[str]:
    """The queues some worker must consume for this configuration: each sink's a stream
    writes to, dead letters and acknowledgements, and `produce` when a source is scheduled."""
    needed = [ingest_queue(s) for s in SINK_NAMES if s in settings.sinks_fed]
    needed += ["dead_letter", "progress"]
    if any(getattr(cfg, "schedule", None) for cfg in settings.sources.values()):
        needed.append("produce")
    return needed


def collect_status(
    ctx: Context, app: Any, *, timeout: float = 1.0, engine: Engine | None = None
) -> StatusReport:
    """Everything `sluice status` shows. `timeout`: how long workers have to answer; `engine`:
    a PostgreSQL engine to read with (`sluice serve` keeps one), else one is made and disposed."""
    errors: dict[str, str] = {}
    eng = engine
    if eng is None and uses_postgres(ctx.settings):
        eng = ops_engine(ctx.postgres_url)
    store = ops_state(ctx.settings, eng)
    report = StatusReport(
        time=datetime.now(UTC),
        broker=broker_kind(ctx.broker_url),
        state=store.name,
        queues_needed=queues_needed(ctx.settings),
    )
    down = report.unreachable
    try:
        with ThreadPoolExecutor(1) as pool:
            # The workers' broadcast waits `timeout`; read the databases meanwhile.
            workers = pool.submit(workers_online, app, timeout)
            report.queues = _part(errors, "queues", lambda: broker_queue_depths(ctx))
            if report.queues is None:
                down[report.broker_name] = errors["queues"]
            if eng is not None:
                _part(errors, "postgres", partial(_ping, eng))
                if "postgres" in errors:
                    down["postgres"] = errors["postgres"]
            pg = None if eng is None or "postgres" in errors else eng
            if store.dialect == "sqlite":
                # Through a reader that never creates the file (the store's engine would).
                _part(errors, "state", partial(_ping_sqlite, ctx.settings.sqlite_path))
                if "state" in errors:
                    down["sqlite"] = errors["state"]
            elif "sqlite" in ctx.settings.sinks_fed:
                _part(errors, "sqlite", partial(_ping_sqlite, ctx.settings.sqlite_path))
                if "sqlite" in errors:
                    down["sqlite"] = errors["sqlite"]
            state_up = "state" not in errors and (store.dialect == "sqlite" or pg is not None)
            if state_up:
                report.dead_letters = _part(
                    errors, "dead_letters", partial(dead_letters_pending, store)
                )
                report.prunes = _part(errors, "prunes", partial(last_prunes, store))
            report.sources = collect_sources(ctx, pg, store if state_up else None, errors)
            if not state_up:
                why = report.unknown_because(store.name) or f"{store.name} unreadable"
                for source in report.sources.values():
                    source.runs_unknown = why
            report.workers = _part(errors, "workers", workers.result)
    finally:
        if store.dialect == "sqlite":
            store.dispose()
        if engine is None and eng is not None:
            eng.dispose()
    report.errors = errors
    return report

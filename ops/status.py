"""`sluice status`: the state of the pipeline on one screen (and as JSON, for /status).

- queues: depth as waiting (in the broker's list) + unacked (held by workers). Flower counts only
  the waiting part (LLEN); a page a worker holds is still work to do. On RabbitMQ
  the waiting count comes from a passive `queue.declare`; unacked needs the management API, so it
  is shown as unknown (null).
- dead letters pending, by stream, sink and error class (failed_ingestions).
- sources (every kind): last run (source_runs), lag, last commit, pages in flight; for local D1
  sources the rows not yet processed; for HTTP sources the cursors (source_progress), from which
  their lag is taken.
- workers online with their pool size (Celery remote control: `inspect().stats()`).

Every part is read on its own: a part that fails (PostgreSQL down, say) is reported under
`errors` and the others are still shown.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from sluice.shared.celery_app import QUEUES
from sluice.shared.context import Context
from sluice.shared.database import postgres_engine, quote
from sluice.shared.errors import SluiceError
from sluice.shared.settings import AnySource, D1SourceConfig, KvSourceConfig, Settings
from sluice.shared.state import StateStore, sqlite_engine, state_kind
from sluice.shared.streams import Stream
from sluice.shared.wrangler import d1_path

CONNECT_TIMEOUT = 5  # seconds; operator tools must answer even when a server is unreachable


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
    if scheme in ("redis", "rediss", "unix"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    return scheme


Depths = dict[str, dict[str, int | None]]


def _widen(depths: dict[str, dict[str, int]]) -> Depths:
    return {q: dict[str, int | None](d) for q, d in depths.items()}


def broker_queue_depths(ctx: Context) -> Depths:
    url = ctx.broker_url
    kind = broker_kind(url)
    if kind == "amqp":
        return amqp_queue_depths(url)
    if kind != "redis":
        raise SluiceError(f"queue depths: unsupported broker {kind!r} (redis or amqp)")
    tracking = ctx.settings.env.get("SLUICE_REDIS_URL")
    if not tracking or tracking == url:
        return _widen(queue_depths(ctx.redis))
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=CONNECT_TIMEOUT)
    try:
        return _widen(queue_depths(client))
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


def dead_letters_pending(store: StateStore) -> list[dict[str, Any]]:
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
        {
            "stream": r[0],
            "sink": r[1],
            "error_class": r[2],
            "count": int(r[3]),
            "oldest": _iso(r[4]),
            "newest": _iso(r[5]),
        }
        for r in rows
    ]


def _iso(value: Any) -> str | None:
    dt = _as_utc(value)
    return dt.isoformat() if dt else None


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


def configured_sources(settings: Settings) -> dict[str, AnySource]:
    """Every configured source by name, of every kind (D1, HTTP APIs, KV)."""
    return dict(settings.sources)


def source_cursors(store: StateStore, source: str) -> dict[str, datetime]:
    """An HTTP source's cursors by partition (`source_progress`): everything before a cursor has
    been committed by every sink."""
    from sluice.producers.cursors import CursorStore

    return CursorStore(store).get_all(source)


def cursor_lag(now: datetime, cursors: dict[str, datetime] | None) -> float | None:
    """Now minus the cursor of the partition furthest behind (None without a cursor)."""
    if not cursors:
        return None
    return round((now - min(cursors.values())).total_seconds(), 1)


def d1_unprocessed(cfg: Any, stream: Stream) -> int | None:
    """Rows a local D1 source has not processed yet (the (processed_at, id) index makes this a
    range count over the backlog). None for remote D1 sources (counting would bill D1 rows
    read) and for sources that are not D1."""
    if not isinstance(cfg, D1SourceConfig) or cfg.mode != "local":
        return None

    if cfg.path:
        path = Path(cfg.path)
    elif cfg.wrangler_state and cfg.database_id:
        path = d1_path(Path(cfg.wrangler_state), cfg.database_id)
    else:
        return None
    conn = sqlite_reader(path)
    try:
        table = quote(cfg.table or stream.table)
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE processed_at IS NULL").fetchone()
        return int(row[0])
    finally:
        conn.close()


def kv_migration(store: StateStore, source: str) -> dict[str, Any] | None:
    """A one-time KV source's migration (`source_migrations`): state, what it saw, pages
    committed by every sink out of those enqueued. None before its first run."""
    from sluice.producers.kv_source import MigrationState

    row = MigrationState(store).get(source)
    if row is None:
        return None
    return {
        "status": row["status"],
        "keys_seen": int(row["keys_seen"]),
        "keys_unmapped": int(row["keys_unmapped"]),
        "records": int(row["records"]),
        "dead_letters": int(row["dead_letters"]),
        "pages_total": row["pages_total"],
        "pages_acked": int(row["pages_acked"] or 0),
        "started_at": _iso(_as_utc(row["started_at"])),
        "completed_at": _iso(_as_utc(row["completed_at"])),
    }


def last_run(store: StateStore, source: str) -> dict[str, Any] | None:
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
    return {
        "run_id": r[0],
        "status": r[1],
        "pages": int(r[2]),
        "records": int(r[3]),
        "started_at": _iso(started),
        "seconds": round((finished - started).total_seconds(), 3) if started and finished else None,
        "error": r[6],
        "failed_last_24h": int(failed or 0),
    }


def pages_in_flight(ctx: Context, source: str) -> tuple[int, float | None]:
    """Pages of the source published but not yet committed by every sink, and the age of the
    oldest (a page older than `inflight_lease` is presumed lost and its rows are read again)."""
    key = ctx.progress._inflight(source)
    count = int(ctx.redis.zcard(key))
    oldest = ctx.redis.zrange(key, 0, 0, withscores=True)
    age = datetime.now(UTC).timestamp() - float(oldest[0][1]) if oldest else None
    return count, round(age, 1) if age is not None else None


def _part(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}".strip()
        return None


def _seconds_since(now: datetime, then: datetime | None) -> float | None:
    """Seconds from `then` to `now`, never negative: a time in the future (a source's clock
    ahead, a wrong time zone) is reported by `future_times`, not as a negative lag."""
    return round(max(0.0, (now - then).total_seconds()), 1) if then else None


FUTURE_SLACK = timedelta(minutes=1)  # clocks of sources and sinks may differ this much


def sources_status(
    ctx: Context, pg: Engine | None, store: StateStore | None, errors: dict[str, str]
) -> dict[str, Any]:
    """Each configured source, of every kind. `pg` is None when PostgreSQL is unreachable (or
    not used), `store` when the state store is: what lives there (runs, cursors, and lag/commit
    when the stream goes to PostgreSQL) is then unknown (None).

    Lag: for a D1 source, now - the newest event time committed for its stream; for an HTTP
    source, now - the cursor of its partition furthest behind (`source_progress`), since several
    sources share one stream. Backlog and mode are D1 fields and are only given for D1."""
    now = datetime.now(UTC)
    out: dict[str, Any] = {}
    newest: dict[str, datetime | None] = {}
    for name, cfg in sorted(configured_sources(ctx.settings).items()):
        stream = ctx.settings.stream(cfg.stream)
        in_sink = pg is not None or _primary_sink(stream) != "postgres"
        committed = (
            _part(errors, f"commit:{name}", partial(last_commit, ctx, pg, stream, name))
            if in_sink
            else None
        )
        in_flight = _part(errors, f"in_flight:{name}", partial(pages_in_flight, ctx, name))
        entry: dict[str, Any] = {"kind": cfg.kind, "stream": stream.name}
        if isinstance(cfg, D1SourceConfig):
            if stream.name not in newest:
                newest[stream.name] = (
                    _part(
                        errors, f"lag:{stream.name}", partial(newest_record_time, ctx, pg, stream)
                    )
                    if in_sink
                    else None
                )
            record_time = newest[stream.name]
            entry.update(
                mode=cfg.mode,
                lag_seconds=_seconds_since(now, record_time),
                newest_record=_iso(record_time),
            )
            if record_time is not None and record_time > now + FUTURE_SLACK:
                entry["future_times"] = f"newest event time {_iso(record_time)} is in the future"
        elif isinstance(cfg, KvSourceConfig):
            entry.update(
                streams=cfg.streams,
                mode=cfg.mode,
                migration=_part(errors, f"migration:{name}", partial(kv_migration, store, name))
                if store is not None
                else None,
            )
        else:
            cursors = (
                _part(errors, f"cursor:{name}", partial(source_cursors, store, name))
                if store is not None
                else None
            )
            entry.update(
                lag_seconds=cursor_lag(now, cursors),
                cursors={p: _iso(c) for p, c in sorted(cursors.items())}
                if cursors is not None
                else None,
            )
        entry.update(
            last_commit=_iso(committed),
            last_commit_seconds_ago=_seconds_since(now, committed),
        )
        if isinstance(cfg, D1SourceConfig):
            entry["unprocessed"] = _part(
                errors, f"unprocessed:{name}", partial(d1_unprocessed, cfg, stream)
            )
        entry.update(
            pages_in_flight=in_flight[0] if in_flight else None,
            oldest_in_flight_seconds=in_flight[1] if in_flight else None,
            last_run=_part(errors, f"last_run:{name}", partial(last_run, store, name))
            if store is not None
            else None,
        )
        out[name] = entry
    return out


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


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
) -> dict[str, dict[str, Any]]:
    """Workers answering remote control within `timeout`, with pool size and queues. The two
    broadcasts run side by side, so this takes about `timeout` seconds."""
    with ThreadPoolExecutor(2) as pool:
        f_stats = pool.submit(lambda: _inspect(app, timeout, nodes).stats() or {})
        f_queues = pool.submit(lambda: _inspect(app, timeout, nodes).active_queues() or {})
        stats: dict[str, Any] = f_stats.result()
        queues: dict[str, Any] = f_queues.result()
    out: dict[str, dict[str, Any]] = {}
    for node, st in sorted(stats.items()):
        pool_info = st.get("pool") or {}
        auto = st.get("autoscaler")
        out[node] = {
            "concurrency": pool_size(st),
            "max_concurrency": pool_info.get("max-concurrency"),
            "autoscale": {"max": auto.get("max"), "min": auto.get("min")} if auto else None,
            "pool": pool_info.get("implementation"),
            "queues": sorted(q.get("name", "?") for q in queues.get(node) or []),
            "pid": st.get("pid"),
            "uptime_seconds": st.get("uptime"),
            "tasks": sum((st.get("total") or {}).values()),
        }
    return out


# -- the whole screen --------------------------------------------------------------------------


def build_status(
    ctx: Context, app: Any, *, timeout: float = 1.0, engine: Engine | None = None
) -> dict[str, Any]:
    errors: dict[str, str] = {}
    own_engine = engine is None
    eng = engine
    if eng is None and uses_postgres(ctx.settings):
        eng = ops_engine(ctx.postgres_url)
    store = ops_state(ctx.settings, eng)
    try:
        with ThreadPoolExecutor(1) as pool:
            # The workers' broadcast waits `timeout`; read the databases meanwhile.
            workers_f = pool.submit(workers_online, app, timeout)
            doc: dict[str, Any] = {
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "broker": broker_kind(ctx.broker_url),
                "state": store.name,
                "queues": _part(errors, "queues", lambda: broker_queue_depths(ctx)),
            }
            if eng is not None:
                _part(errors, "postgres", partial(_ping, eng))
            pg = None if eng is None or "postgres" in errors else eng
            if store.dialect == "sqlite":
                _part(errors, "state", partial(_ping, store.engine))
            state_up = "state" not in errors and (store.dialect == "sqlite" or pg is not None)
            pending = (
                _part(errors, "dead_letters", partial(dead_letters_pending, store))
                if state_up
                else None
            )
            doc["dead_letters"] = {
                "pending": sum(d["count"] for d in pending) if pending is not None else None,
                "by_stream": pending,
            }
            doc["sources"] = sources_status(ctx, pg, store if state_up else None, errors)
            doc["workers"] = _part(errors, "workers", workers_f.result)
    finally:
        if store.dialect == "sqlite":
            store.dispose()
        if own_engine and eng is not None:
            eng.dispose()
    doc["errors"] = errors
    return doc


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(abs(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


def format_depths(depths: dict[str, Any]) -> str:
    lines = [f"{'queue':<18}{'waiting':>10}{'unacked':>10}{'total':>10}"]
    for q, d in depths.items():
        unacked = "?" if d["unacked"] is None else d["unacked"]
        lines.append(f"{q:<18}{d['waiting']:>10}{unacked:>10}{d['total']:>10}")
    return "\n".join(lines)


def format_status(doc: dict[str, Any]) -> str:
    out: list[str] = []
    if doc.get("queues") is not None:
        out.append(format_depths(doc["queues"]))
        if doc.get("broker") == "amqp":
            out.append("  (RabbitMQ: unacked is only visible in the management UI/API)")
    else:
        out.append("queues: unavailable")

    dl = doc.get("dead_letters") or {}
    out.append("")
    if dl.get("by_stream") is None:
        out.append("dead letters pending: unavailable")
    else:
        out.append(f"dead letters pending: {dl['pending']}")
        if dl["by_stream"]:
            out.append(f"  {'stream':<22}{'sink':<10}{'error':<26}{'count':>7}  newest")
            for d in dl["by_stream"]:
                newest = _age_of(d["newest"])
                out.append(
                    f"  {d['stream']:<22}{d['sink']:<10}{d['error_class']:<26}"
                    f"{d['count']:>7}  {newest} ago"
                )

    out.append("")
    sources = doc.get("sources") or {}
    out.append(f"sources ({len(sources)})")
    if sources:
        out.append(f"  {'source':<18}{'lag':>9}{'commit':>9}{'backlog':>9}{'flight':>7}  last run")
    for name, s in sources.items():
        run = s.get("last_run")
        if run:
            took = f" in {run['seconds']}s" if run["seconds"] is not None else ""
            run_text = (
                f"{run['status']} {_age_of(run['started_at'])} ago: {run['pages']} pages, "
                f"{run['records']} records{took}"
            )
            if run["failed_last_24h"]:
                run_text += f"; {run['failed_last_24h']} failed in 24h"
            if run["status"] != "skipped" and run["error"]:  # failed, or an anomaly
                run_text += f" — {run['error'][:60]}"
        if s.get("future_times"):
            run_text += f"; {s['future_times']}"
        else:
            run_text = "never ran"
        if s.get("migration"):
            m = s["migration"]
            run_text += (
                f"; migration {m['status']}: {m['keys_seen']} keys, {m['records']} records,"
                f" {m['dead_letters']} dead letters, pages {m['pages_acked']}/"
                f"{m['pages_total'] if m['pages_total'] is not None else '?'}"
            )
        backlog = "—" if s.get("unprocessed") is None else s["unprocessed"]
        flight = "—" if s.get("pages_in_flight") is None else s["pages_in_flight"]
        out.append(
            f"  {name:<18}{_ago(s.get('lag_seconds')):>9}"
            f"{_ago(s.get('last_commit_seconds_ago')):>9}{backlog!s:>9}{flight!s:>7}  {run_text}"
        )

    out.append("")
    workers = doc.get("workers")
    if workers is None:
        out.append("workers: unavailable")
    else:
        out.append(f"workers online: {len(workers)}")
        for node, w in workers.items():
            size = f"concurrency {w['concurrency']}"
            if w.get("autoscale"):
                size += f" (autoscale {w['autoscale']['min']}..{w['autoscale']['max']})"
            out.append(f"  {node:<32}{size:<32}{','.join(w['queues'])}")

    if doc.get("errors"):
        out.append("")
        out.append("errors:")
        for part, msg in doc["errors"].items():
            out.append(f"  {part}: {msg.splitlines()[0][:160]}")
    return "\n".join(out)


def _age_of(iso: str | None) -> str:
    if not iso:
        return "—"
    return _ago((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds())

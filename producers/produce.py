"""One run of a source: read pages after the resume point and enqueue each to its sinks' queues.

A run never overlaps another run of the same source (a Redis lock); a second run started at the
same time returns at once as "skipped". Each page is registered as in flight before it is
published (shared/progress.py), so the next run continues after it instead of enqueuing it again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from producers.registry import open_source
from shared.celery_app import app, send_page
from shared.context import Context
from shared.errors import SluiceError
from shared.page import Page
from shared.settings import KvSourceConfig
from shared.streams import Stream

log = logging.getLogger("sluice.produce")

LOCK_SECONDS = 300  # extended after every page, so only a dead run's lock expires


@dataclass
class RunSummary:
    source: str
    run_id: str
    status: str  # ok | skipped | failed
    pages: int = 0
    records: int = 0
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_source(ctx: Context, name: str, max_batches: int | None = None) -> RunSummary:
    run_id = uuid.uuid4().hex
    t0 = time.perf_counter()
    lock = ctx.redis.lock(f"sluice:lock:source:{name}", timeout=LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        return RunSummary(name, run_id, "skipped", error="another run of this source is active")
    summary = RunSummary(name, run_id, "ok")
    started = datetime.now(UTC)
    source = None
    try:
        source = open_source(ctx.settings, name)
        stream = source.stream
        cfg = ctx.settings.source_config(name)
        assert cfg is not None  # open_source found it
        # HTTP sources keep a cursor per partition: they need every window in flight, not the
        # single highest key a D1 table resumes after.
        if getattr(source, "resumes_per_partition", False):
            after = ctx.progress.resume_keys(name)
        else:
            after = ctx.progress.resume_after(name)
        for sp in source.pages(after, max_batches or cfg.max_batches):
            # A source feeding several streams (KV) names each page's stream.
            page_stream = ctx.settings.stream(sp.stream) if sp.stream else stream
            publish_page(ctx, page_stream, name, run_id, sp.rows, sp.ack, sp.last_key)
            summary.pages += 1
            summary.records += len(sp.rows)
            lock.extend(LOCK_SECONDS, replace_ttl=True)
        anomalies = list(getattr(source, "anomalies", []))
        if anomalies:  # worked around (the run succeeded); recorded for operators
            summary.error = "anomaly: " + "; ".join(anomalies)[:2000]
    except SluiceError as exc:
        summary.status, summary.error = "failed", str(exc)[:2000]
        log.error("source %s run %s failed: %s", name, run_id, exc)
    finally:
        if source is not None:
            source.close()
        lock.release()
    summary.seconds = round(time.perf_counter() - t0, 3)
    _record_run(ctx, summary, started, stream_name(ctx, name))
    return summary


def publish_page(
    ctx: Context,
    stream: Stream,
    source: str,
    run_id: str,
    rows: Sequence[Sequence[Any]],
    ack: Any,
    last_key: Any,
) -> None:
    """Register a page as in flight (before it is visible to any worker, so the next run
    continues after it), then put it on each of its stream's sink queues."""
    page = Page(uuid.uuid4().hex, stream.name, "", source, run_id, list(stream.column_names), rows)
    ctx.progress.register(source, page.id, stream.sinks, ack, last_key)
    for sink in stream.sinks:
        send_page(page.for_sink(sink))


def stream_name(ctx: Context, source: str) -> str:
    cfg = ctx.settings.source_config(source)
    if isinstance(cfg, KvSourceConfig):
        return ",".join(cfg.streams)[:200]  # a KV source feeds several streams
    return cfg.stream if cfg else "unknown"


def _record_run(ctx: Context, s: RunSummary, started: datetime, stream: str) -> None:
    try:
        with ctx.state.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO source_runs (run_id, source, stream, started_at, finished_at,"
                    " status, pages, records, error) VALUES (:run_id, :source, :stream,"
                    " :started, now(), :status, :pages, :records, :error)"
                ),
                {
                    "run_id": s.run_id,
                    "source": s.source,
                    "stream": stream,
                    "started": started,
                    "status": s.status,
                    "pages": s.pages,
                    "records": s.records,
                    "error": s.error,
                },
            )
    except Exception as exc:  # the run itself succeeded; its history row is best effort
        log.warning("could not record run %s of %s: %s", s.run_id, s.source, exc)


@app.task(name="sluice.produce")
def produce(source: str) -> dict[str, Any]:
    return run_source(app.context, source).as_dict()

"""One run of a source: read pages after the resume point and enqueue each to its sinks' queues.

A run never overlaps another run of the same source (a Redis lock); a second run started at the
same time returns at once as "skipped". Each page is registered as in flight before it is
published (shared/progress.py), so the next run continues after it instead of enqueuing it again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import redis
from kombu.exceptions import EncodeError
from redis.exceptions import LockError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from sluice.producers.registry import open_source
from sluice.producers.source import SourceReject
from sluice.shared.celery_app import app, send_page
from sluice.shared.context import Context
from sluice.shared.controls import Control, paused
from sluice.shared.errors import SluiceError, SourceError
from sluice.shared.letters import (
    SOURCE_SINK,
    DeadLetter,
    record_of_item,
    send_dead_letters,
    text_field,
)
from sluice.shared.page import Page
from sluice.shared.progress import letters_member
from sluice.shared.records import record_key
from sluice.shared.streams import Stream

log = logging.getLogger("sluice.produce")

# The run's lock is a short lease renewed while the run is alive: a run killed mid-way frees its
# source within LOCK_SECONDS, and a run that lives longer keeps it as long as it needs.
LOCK_SECONDS = 30


@dataclass
class RunSummary:
    source: str
    run_id: str
    status: str  # running, then: ok | partial (some partitions failed) | skipped | failed
    pages: int = 0
    records: int = 0
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SourceLock:
    """One run of a source at a time, across every machine: a Redis lock held as a short lease
    that a background thread renews while the run is alive."""

    def __init__(self, client: redis.Redis, source: str, lease: float = LOCK_SECONDS) -> None:
        # thread_local=False: the renewing thread must see the token the run's thread took.
        self._lock = client.lock(f"sluice:lock:source:{source}", timeout=lease, thread_local=False)
        self._lease = lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # the lease ran out (Redis restarted, the process stalled)

    def acquire(self) -> bool:
        if not self._lock.acquire(blocking=False):
            return False
        self._thread = threading.Thread(target=self._renew, name="sluice-lock", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                self._lock.extend(self._lease, replace_ttl=True)
            except LockError:
                self.lost = True
                return
            except redis.RedisError as exc:  # the next renewal may succeed within the lease
                log.warning("could not renew the run lock: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(LockError, redis.RedisError):
            self._lock.release()


def run_source(
    ctx: Context, name: str, max_batches: int | None = None, run_id: str | None = None
) -> RunSummary:
    """One run of the source; `run_id` names it (the console's "run now" gives one back before
    the run starts). Recorded in `source_runs`: as `running` while it goes, then its outcome."""
    cfg = ctx.settings.source(name)  # an unknown name is an error, not a failed run
    asked_id = run_id
    run_id = run_id or uuid.uuid4().hex
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    control = _paused(ctx, name)
    if control is not None:
        reason = f": {control.reason}" if control.reason else ""
        summary = RunSummary(name, run_id, "skipped", error=f"paused{reason}")
        _record_run(ctx, summary, started, stream_name(ctx, name))
        return summary
    lock = SourceLock(ctx.redis, name)
    if not lock.acquire():
        summary = RunSummary(name, run_id, "skipped", error="another run of this source is active")
        if asked_id is not None:  # a run asked for by id (run now) is followed by that id
            _record_run(ctx, summary, started, stream_name(ctx, name))
        return summary
    summary = RunSummary(name, run_id, "running")
    _record_run(ctx, summary, started, stream_name(ctx, name))
    summary.status = "ok"
    source = None
    try:
        abandoned = ctx.progress.forget_unpublished(name)
        if abandoned is not None:
            log.warning("source %s: page %s of a run that died is read again", name, abandoned)
        source = open_source(ctx.settings, name)
        stream = source.stream
        # HTTP sources keep a cursor per partition: they need every window in flight, not the
        # single highest key a D1 table resumes after.
        if getattr(source, "resumes_per_partition", False):
            after = ctx.progress.resume_keys(name)
        else:
            after = ctx.progress.resume_after(name)
        for sp in source.pages(after, max_batches or cfg.max_batches):
            # A source feeding several streams (KV) names each page's stream.
            page_stream = ctx.settings.stream(sp.stream) if sp.stream else stream
            publish_page(
                ctx,
                page_stream,
                name,
                run_id,
                sp.rows,
                sp.ack,
                sp.last_key,
                sp.rejected,
                sp.op,
                sp.orders,
            )
            summary.pages += 1
            summary.records += len(sp.rows)
            if lock.lost:
                raise SourceError("the run lost its lock (lease expired); stopped", source=name)
        failures = list(getattr(source, "failures", []))
        anomalies = list(getattr(source, "anomalies", []))
        if failures:  # some partitions failed for good; the others went on
            summary.status = "partial"
            summary.error = ("failed: " + "; ".join(failures))[:2000]
        elif anomalies:  # worked around (the run succeeded); recorded for operators
            summary.error = "anomaly: " + "; ".join(anomalies)[:2000]
    except SluiceError as exc:
        summary.status, summary.error = "failed", str(exc)[:2000]
        log.error("source %s run %s failed: %s", name, run_id, exc)
    except Exception as exc:  # a bug or an unforeseen answer: the run is still recorded
        summary.status = "failed"
        summary.error = f"internal error: {type(exc).__name__}: {exc}"[:2000]
        log.exception("source %s run %s failed", name, run_id)
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
    rejected: Sequence[SourceReject] = (),
    op: str = "upsert",
    orders: list[int] | None = None,
) -> None:
    """Register a page as in flight (before it is visible to any worker, so the next run
    continues after it), then put it on each of its stream's sink queues. Items the source could
    not read go to the dead-letter queue, and the page waits for them to be stored. `op`
    "delete": the rows are keys to remove from every sink."""
    page_id = uuid.uuid4().hex
    member = letters_member(SOURCE_SINK)
    to_sinks = bool(rows) or not rejected
    members = [*(stream.sinks if to_sinks else ()), *((member,) if rejected else ())]
    # Rows without an order of their own are ordered as read: reserved with the registration.
    reserve = 0 if orders is not None else len(rows)
    seq = ctx.progress.register(source, page_id, members, ack, last_key, rows=reserve)
    columns = list(stream.column_names if op == "upsert" else stream.key)
    explicit: list[int | None] | None = None if orders is None else list(orders)
    page = Page(page_id, stream.name, "", source, run_id, columns, rows, seq, explicit, op)
    if to_sinks:
        try:
            send_page(page.for_sink(stream.sinks[0]))
        except EncodeError:
            # A value the queue cannot carry (text with an unpaired surrogate, from a JSON
            # "\ud800" escape): nothing of the page was sent. Its other rows go on, and those
            # rows become dead letters, kept exactly.
            ctx.progress.done(source, page_id)
            good, bad = _split_unsendable(stream, rows, orders)
            kept = [o for o, _ in good] if orders is not None else None
            publish_page(
                ctx,
                stream,
                source,
                run_id,
                [r for _, r in good],
                ack,
                last_key,
                [*rejected, *bad],
                op,
                kept,
            )
            return
        for sink in stream.sinks[1:]:
            send_page(page.for_sink(sink))
    if rejected:
        letters = [
            DeadLetter(
                stream=r.stream or stream.name,
                sink=SOURCE_SINK,
                source=source,
                page_id=page_id,
                record_key=r.key,
                record=record_of_item(r.item),
                error_class=r.error_class,
                error_message=r.error,
                run_id=run_id,
            )
            for r in rejected
        ]
        send_dead_letters(letters, page_id, member)
    ctx.progress.published(source)


def _split_unsendable(
    stream: Stream, rows: Sequence[Sequence[Any]], orders: list[int] | None
) -> tuple[list[tuple[int, Sequence[Any]]], list[SourceReject]]:
    """The rows msgpack can carry (with their orders), and the others as dead letters."""
    good: list[tuple[int, Sequence[Any]]] = []
    bad: list[SourceReject] = []
    for i, row in enumerate(rows):
        try:
            msgpack.packb(list(row), use_bin_type=True)
            good.append((orders[i] if orders is not None else i, row))
        except (TypeError, ValueError, OverflowError) as exc:
            key = record_key(stream, row)
            bad.append(SourceReject(key, list(row), f"cannot be sent through the queue: {exc}"))
    return good, bad


def stream_name(ctx: Context, source: str) -> str:
    """The stream(s) a run of the source feeds, as its run row names them."""
    return ",".join(ctx.settings.source(source).streams)[:200]


def _paused(ctx: Context, name: str) -> Control | None:
    try:
        return paused(ctx.state, name)
    except SQLAlchemyError as exc:  # the store is down: run (pausing is an operator's wish)
        log.warning("could not read whether %s is paused: %s", name, exc)
        return None


def _record_run(ctx: Context, s: RunSummary, started: datetime, stream: str) -> None:
    """Insert or finish the run's row. A `running` row left by a run that died (its process
    killed) is closed as `died` when the next run of the source starts: that run holds the
    source's lock, so no other run of it is alive."""
    state = ctx.state
    params = {
        "run_id": s.run_id,
        "source": s.source,
        "stream": stream,
        "started": state.ts(started),
        "finished": None if s.status == "running" else state.now(),
        "status": s.status,
        "pages": s.pages,
        "records": s.records,
        "error": text_field(s.error, 2000) if s.error else None,
    }
    try:
        with state.write() as conn:
            if s.status == "running":
                conn.execute(
                    text(
                        "UPDATE source_runs SET status = 'died', finished_at = :now, error ="
                        " 'the run stopped without recording its end (its process was killed?)'"
                        " WHERE source = :source AND status = 'running' AND kind = 'produce'"
                    ),
                    {"source": s.source, "now": state.now()},
                )
            conn.execute(
                text(
                    "INSERT INTO source_runs (run_id, source, stream, started_at, finished_at,"
                    " status, pages, records, error) VALUES (:run_id, :source, :stream,"
                    " :started, :finished, :status, :pages, :records, :error)"
                    " ON CONFLICT (run_id) DO UPDATE SET finished_at = excluded.finished_at,"
                    " status = excluded.status, pages = excluded.pages,"
                    " records = excluded.records, error = excluded.error"
                ),
                params,
            )
    except Exception as exc:  # the run itself succeeded; its history row is best effort
        log.warning("could not record run %s of %s: %s", s.run_id, s.source, exc)


@app.task(name="sluice.produce")
def produce(source: str, run_id: str | None = None) -> dict[str, Any]:
    return run_source(app.context, source, run_id=run_id).as_dict()

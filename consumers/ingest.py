"""The ingest task: page → validate → dedupe → sink → dead letters → progress.

Runs on the queue of its sink (`ingest.postgres`, `.sqlite`, `.d1`). Every outcome is explicit:
- committed: the page's valid records are in the sink (once, whatever the deliveries);
- transient sink error: the page is retried with exponential backoff and full jitter; when the
  retries run out its records become dead letters, never dropped;
- invalid records and records the sink refused: dead letters, while the rest is committed;
- records whose parent row is missing (a foreign key): the page is retried a bounded number of
  times first, because the parent may be in a page still on its way (see `_waits_for_parent`).
A page with dead letters is acknowledged to its source only after the letters are stored
(consumers/dead_letter.py releases it). The message is acknowledged only when the task returns
(late ack), so a killed worker's page is delivered again and the keyed writes make that harmless.
A redelivery finds its dead letters again: validation is deterministic, and a page whose records
a sink refused never committed as a whole (only its isolated parts did), so its write is refused
again and isolation finds the same records.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task

from sluice.shared import ingest_delay
from sluice.shared.acknowledge import acknowledge_page
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.errors import (
    ForeignKeyViolationError,
    MessageError,
    RejectedBySinkError,
    SinkError,
    SluiceError,
    TransientSinkError,
    UnknownStreamError,
)
from sluice.shared.letters import DeadLetter, encode_record, record_of_row, send_dead_letters
from sluice.shared.page import Page, decode, unpack
from sluice.shared.progress import letters_member
from sluice.shared.records import Rejected, Validator, dedupe, record_key
from sluice.shared.sinks import PageMeta, Sink, WriteResult
from sluice.shared.streams import Stream

log = logging.getLogger("sluice.ingest")

# The longest wait before a retry. The worker holds a page it retries later and keeps renewing
# it (shared/heartbeat.py), so the wait need not stay under the broker's visibility timeout.
RETRY_CAP_SECONDS = 300.0


def backoff(attempt: int, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, 0.5 s · 2^attempt)] (spreads retries of many pages)."""
    return random.uniform(0, min(cap, 0.5 * 2**attempt))


@app.task(name="sluice.ingest", bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest(self: Task, body: object) -> dict[str, Any]:
    ctx = app.context
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        page = decode(body)
        stream = ctx.settings.stream(page.stream)
    except (MessageError, UnknownStreamError) as exc:
        _dead_letter_message(body, exc)
        return {"status": "malformed", "error": str(exc)}

    if page.op == "delete":
        rows, rejected = _keys_with_orders(ctx.validator(stream), page)
    else:
        good, rejected = ctx.validator(stream).validate(page.columns, page.rows, _orders(page))
        rows = dedupe(stream, good)
    meta = PageMeta(
        page_id=page.id,
        source=page.source,
        run_id=page.run,
        received=len(page.rows),
        invalid=len(rejected),
        attempts=self.request.retries + 1,
        started_at=started,
    )
    sink = ctx.sink(page.sink)
    max_retries = ctx.settings.pipeline.max_retries
    try:
        if page.op == "delete":
            result = sink.delete(stream, rows, meta)
        else:
            result = sink.write(stream, rows, meta)
    except TransientSinkError as exc:
        if self.request.retries < max_retries:
            delay = backoff(self.request.retries, RETRY_CAP_SECONDS)
            log.warning(
                "page %s to %s: %s; retry %d/%d in %.1fs",
                page.id,
                page.sink,
                exc,
                self.request.retries + 1,
                max_retries,
                delay,
            )
            raise self.retry(exc=exc, countdown=delay, max_retries=max_retries) from exc
        log.error("page %s to %s: retries exhausted: %s", page.id, page.sink, exc)
        rejected += [Rejected(r, None, str(exc), "RetriesExhausted") for r in rows]
        result = WriteResult(0, 0)
    except RejectedBySinkError as exc:
        waits = _waits_for_parent(stream, self.request.retries, ctx.settings.pipeline.fk_retries)
        if waits and isinstance(exc, ForeignKeyViolationError):
            raise _retry_for_parent(self, page, exc) from exc
        # The database refused something validation let through: isolate it.
        result, refused = _isolate(sink, stream, rows, meta, exc)
        if waits and any(r.error_class == FK_ERROR for r in refused):
            # Parts already committed are skipped on redelivery (their sub-page ids are known).
            raise _retry_for_parent(self, page, exc) from exc
        rejected += refused
    except SinkError as exc:
        log.error("page %s to %s failed: %s", page.id, page.sink, exc)
        rejected += [Rejected(r, None, str(exc), type(exc).__name__) for r in rows]
        result = WriteResult(0, 0)
    else:
        if page.op != "delete" and not result.already_committed:
            _observe_delay(ctx, stream, page.sink, rows)

    if rejected:
        # The page waits for its letters: held before they are sent, released once stored.
        member = letters_member(page.sink)
        ctx.progress.committed(page.id, page.sink, hold=member)
        send_dead_letters([_dead_letter(stream, page, r) for r in rejected], page.id, member)
    elif ctx.progress.committed(page.id, page.sink):
        _acknowledge(ctx, page)
    return {
        "page": page.id,
        "sink": page.sink,
        "stream": page.stream,
        "received": meta.received,
        "inserted": result.inserted,
        "updated": result.updated,
        "unchanged": result.unchanged,
        "duplicates": result.duplicates,
        "deleted": result.deleted,
        "dead_letters": len(rejected),
        "ms": round((time.perf_counter() - t0) * 1000, 2),
    }


def _observe_delay(ctx: Context, stream: Stream, sink: str, rows: Sequence[Sequence[Any]]) -> None:
    """Count the page's ingest delays (commit time - record time) where `sluice serve` reads
    them. A metric is not worth failing a committed page for: a Redis error is logged."""
    try:
        ingest_delay.record(
            ctx.redis, stream.name, sink, ingest_delay.observe(stream, rows, datetime.now(UTC))
        )
    except redis.RedisError as exc:
        log.warning("page to %s: ingest delay not recorded: %s", sink, exc)


def _orders(page: Page) -> Sequence[int | None]:
    """One source order per row of the page."""
    n = len(page.rows)
    if page.orders is not None:
        return [*page.orders[:n], *[None] * (n - len(page.orders))]
    if page.seq is not None:
        return range(page.seq, page.seq + n)
    return [None] * n


def _keys_with_orders(validator: Validator, page: Page) -> tuple[list[list[Any]], list[Rejected]]:
    """A deletion page's keys, normalised as the sinks hold them, each followed by its source
    order."""
    good: list[list[Any]] = []
    bad: list[Rejected] = []
    width = len(validator.stream.key)
    for i, key in enumerate(page.rows):
        if not isinstance(key, list | tuple) or len(key) != width:
            bad.append(Rejected([key], None, f"a key must be a list of {width} values", index=i))
            continue
        values, field, rule = validator.check_key(key)
        if field is not None:
            bad.append(Rejected(list(key), field, str(rule), index=i))
            continue
        good.append([*values, page.order(i)])
    return good, bad


FK_ERROR = "ForeignKeyViolation"


def _waits_for_parent(stream: Stream, retries: int, fk_retries: int) -> bool:
    """Whether a foreign-key failure of this page should be retried rather than dead-lettered.

    Parents are enqueued before their children (a KV migration yields its `users` pages first),
    but pages travel through the queues and workers in parallel, so a child page can reach the
    database before its parent's page has committed. Making the producer wait for the parents'
    commit would serialise runs on the workers; instead the child page is retried a bounded
    number of times (doubling delays, about 15 s in all by default). A child whose parent never
    arrives then becomes a dead letter naming the missing parent; the rest of its page commits."""
    return bool(stream.foreign_keys) and retries < fk_retries


def _retry_for_parent(task: Task, page: Page, exc: ForeignKeyViolationError | Exception) -> Any:
    ctx = app.context
    retries = task.request.retries
    delay = min(RETRY_CAP_SECONDS, ctx.settings.pipeline.fk_retry_seconds * 2**retries)
    log.info(
        "page %s to %s: parent rows missing; retry %d in %.1fs",
        page.id,
        page.sink,
        retries + 1,
        delay,
    )
    return task.retry(exc=exc, countdown=delay, max_retries=retries + 1)


def _refused(stream: Stream, row: Sequence[Any], exc: RejectedBySinkError) -> Rejected:
    if isinstance(exc, ForeignKeyViolationError) and stream.foreign_keys:
        names = stream.column_names
        parents = "; ".join(
            f"parent {fk.parent_table}.{fk.parent_column}="
            f"{row[names.index(fk.column)] if fk.column in names else '?'} missing"
            for fk in stream.foreign_keys
        )
        return Rejected(row, None, f"{parents} ({exc.message})", FK_ERROR)
    return Rejected(row, None, exc.message, "RejectedBySink")


def _acknowledge(ctx: Context, page: Page) -> None:
    """Mark the page processed at its source now, in this process: a separate task per page
    cost a Celery round trip per page, which bounds the SQLite writer. A failed attempt becomes
    the retrying ack task."""
    try:
        acknowledge_page(ctx, page.source, page.id)
        return
    except (SluiceError, redis.RedisError) as exc:
        log.warning("ack of page %s failed (%s); sent as a task", page.id, exc)
    app.send_task("sluice.ack_page", args=[page.source, page.id])


def _isolate(
    sink: Sink, stream: Stream, rows: list[list[Any]], meta: PageMeta, first: RejectedBySinkError
) -> tuple[WriteResult, list[Rejected]]:
    """Bisect the page until each refused record stands alone; commit the rest.

    k bad records among n cost O(k·log n) transactions. Sub-pages are written under derived page
    ids (`<page>/<range>`), so a redelivery during isolation skips the parts already committed.
    """
    refused: list[Rejected] = []
    total = WriteResult(0, 0)
    half = len(rows) // 2
    stack: list[tuple[int, int]] = [(half, len(rows)), (0, half)]
    if len(rows) == 1:
        refused.append(_refused(stream, rows[0], first))
        stack = []
    while stack:
        lo, hi = stack.pop()
        if lo >= hi:
            continue
        part = rows[lo:hi]
        sub = PageMeta(
            f"{meta.page_id}/{lo}-{hi}",
            meta.source,
            meta.run_id,
            len(part),
            0,
            meta.attempts,
            meta.started_at,
        )
        try:
            total += sink.write(stream, part, sub)
        except RejectedBySinkError as exc:
            if hi - lo == 1:
                refused.append(_refused(stream, part[0], exc))
            else:
                mid = (lo + hi) // 2
                stack += [(mid, hi), (lo, mid)]
    # Records dropped as repeats within the page count as its duplicates.
    valid = meta.received - meta.invalid
    repeats = valid - len(rows)
    return WriteResult(
        total.inserted,
        total.duplicates + repeats,
        updated=total.updated,
        unchanged=total.unchanged,
    ), refused


def _dead_letter(stream: Stream, page: Page, r: Rejected) -> DeadLetter:
    """The letter of a rejected record, holding the record as the page carried it."""
    index = r.index if r.index is not None else _index_of(page, r.row, stream)
    if index is not None:
        record = record_of_row(page.columns, page.rows[index])
        order = page.order(index)
    else:  # a page without source orders: the row as validated is what is left
        record = record_of_row(stream.column_names, list(r.row[: len(stream.column_names)]))
        order = None
    message = f"{r.field}: {r.rule}" if r.field else r.rule
    return DeadLetter(
        stream=stream.name,
        sink=page.sink,
        source=page.source,
        page_id=page.id,
        record_key=record_key(stream, r.row),
        record=record,
        error_class=r.error_class,
        error_message=message,
        record_order=order,
        run_id=page.run,
    )


def _index_of(page: Page, row: Sequence[Any], stream: Stream) -> int | None:
    """Where a validated row (ending with its source order) came from in the page."""
    if len(row) != len(stream.column_names) + 1 or row[-1] is None:
        return None
    order = row[-1]
    if page.orders is not None:
        return page.orders.index(order) if order in page.orders else None
    if page.seq is not None and 0 <= order - page.seq < len(page.rows):
        return int(order - page.seq)
    return None


def _dead_letter_message(body: object, exc: Exception) -> None:
    """A message we cannot read at all is kept whole, as it arrived, as one dead letter."""
    try:
        fields = unpack(body)
    except MessageError:
        fields = None
    info = fields if isinstance(fields, dict) else {}
    page_id = str(info.get("id") or "unknown")
    send_dead_letters(
        [
            DeadLetter(
                stream=str(info.get("stream") or "unknown"),
                sink=str(info.get("sink") or "unknown"),
                source=str(info.get("source") or "unknown"),
                page_id=page_id,
                record_key=f"message:{page_id}",
                record=encode_record({"message": body}),
                error_class=type(exc).__name__,
                error_message=str(exc),
                run_id=str(info["run"]) if info.get("run") else None,
            )
        ]
    )

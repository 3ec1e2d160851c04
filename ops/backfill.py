"""`sluice backfill SOURCE --from ISO --to ISO`: fetch a past range of an HTTP source again.

The range is split per partition into the windows the API serves in one go (the source's own
`windows`), taken from the partitions in turn, fetched through the source's rate limiter and
enqueued as pages exactly as a run does (registered in flight, then published to every sink's
queue). Backfills are stoppable and resumable: after each window is enqueued its end is stored in
`source_progress` under source `backfill:<source>`, partition `<partition>:<from>:<to>` (a
separate source name, so the live cursors, their lag and resume points never see it). Running the
same backfill again continues after that point: a window enqueued just before a stop may be
enqueued once more (the keyed writes absorb it), and none is skipped.

The live cursor never moves backwards: the pages' acknowledgements are never a partition's
"first" window, and a cursor only moves forward over a window that starts at or before it
(producers/cursors.py). Their in-flight keys are `backfill:<partition>`, which the live runs'
resume points ignore, so a backfill never makes a live run start over from its windows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from producers.cursors import CursorStore, format_cursor
from producers.http_source import HttpSource
from producers.produce import publish_page
from producers.registry import open_source
from shared.context import Context
from shared.errors import SluiceError

LOCK_SECONDS = 300


@dataclass
class BackfillSummary:
    source: str
    start: str
    end: str
    status: str  # complete | stopped | skipped
    windows_total: int = 0
    windows_done: int = 0  # including the ones done by earlier, interrupted runs
    windows_this_run: int = 0
    pages: int = 0
    records: int = 0
    seconds: float = 0.0
    incomplete: list[str] = field(default_factory=list)  # partitions the API cut short
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def progress_key(partition: str, start: datetime, end: datetime) -> str:
    return f"{partition}:{format_cursor(start)}:{format_cursor(end)}"


def run_backfill(
    ctx: Context,
    source: str,
    start: datetime,
    end: datetime,
    say: Callable[[str], None] | None = None,
    max_windows: int | None = None,
) -> BackfillSummary:
    """Enqueue every window of [start, end) not yet enqueued by an earlier run of the same
    backfill; stop after `max_windows` windows (None: all)."""
    t0 = time.perf_counter()
    summary = BackfillSummary(source, format_cursor(start), format_cursor(end), "complete")
    if end <= start:
        raise SluiceError("backfill: --to must be after --from", source=source)
    lock = ctx.redis.lock(f"sluice:lock:backfill:{source}", timeout=LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        summary.status, summary.error = "skipped", "another backfill of this source is active"
        return summary
    src: Any = None
    try:
        src = open_source(ctx.settings, source)
        if not isinstance(src, HttpSource):
            raise SluiceError("backfill is for HTTP API sources only", source=source)
        _backfill(ctx, src, start, end, say or (lambda _m: None), max_windows, summary, lock)
    finally:
        if src is not None:
            src.close()
        lock.release()
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _backfill(
    ctx: Context,
    src: HttpSource,
    start: datetime,
    end: datetime,
    say: Callable[[str], None],
    max_windows: int | None,
    summary: BackfillSummary,
    lock: Any,
) -> None:
    name, stream = src.name, src.stream
    store = CursorStore(ctx.state)
    book = f"backfill:{name}"
    done_until = store.get_all(book)
    until = min(end, src.closed_until(src.now()))  # never a period still open
    plans: dict[str, Iterator[tuple[datetime, datetime, bool]]] = {}
    for p in src.partitions():
        key = progress_key(p, start, end)
        total = sum(1 for _ in src.windows(start, until))
        summary.windows_total += total
        resume = max(start, done_until.get(key, start))
        remaining = sum(1 for _ in src.windows(resume, until))
        summary.windows_done += total - remaining
        plans[p] = src.windows(resume, until)
    if summary.windows_done:
        say(f"{name}: resuming: {summary.windows_done}/{summary.windows_total} window(s) done")
    run_id = uuid.uuid4().hex
    while plans:
        for p in list(plans):
            w = next(plans[p], None)
            if w is None:
                del plans[p]
                continue
            if max_windows is not None and summary.windows_this_run >= max_windows:
                summary.status = "stopped"  # this window is fetched by the next run
                return
            w_start, w_end, _ = w
            rows, complete_until = src.fetch_window(p, w_start, w_end)
            if complete_until < w_end:
                del plans[p]  # later windows would leave a gap: this partition stops here
                summary.incomplete.append(p)
                w_end = complete_until
            if w_end > w_start:
                ack = {
                    "partition": p,
                    "start": format_cursor(w_start),
                    "end": format_cursor(w_end),
                    "first": False,  # never creates a live cursor, only moves it forward
                }
                if rows:
                    # Ignored by live resume points: a backfill never makes a live run restart.
                    last_key = [f"backfill:{p}", ack["end"]]
                    publish_page(ctx, stream, name, run_id, rows, ack, last_key)
                    summary.pages += 1
                    summary.records += len(rows)
                else:
                    src.acknowledge(ack)  # nothing to commit
                store.set(book, progress_key(p, start, end), w_end)
            summary.windows_done += 1
            summary.windows_this_run += 1
            lock.extend(LOCK_SECONDS, replace_ttl=True)
            say(
                f"{name}: window {summary.windows_done}/{summary.windows_total} "
                f"({p} {format_cursor(w_start)}..{format_cursor(w_end)}), "
                f"{summary.pages} page(s), {summary.records} record(s) enqueued"
            )
    if summary.incomplete:
        summary.status = "stopped"
        summary.error = "the API stopped paging part-way for: " + ", ".join(summary.incomplete)

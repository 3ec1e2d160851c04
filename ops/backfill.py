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

A window is read as a live run reads it (`read_window`): items of the answer that are not records
travel in its page as dead letters, and a window of nothing else is still published (its letters
are stored, then its acknowledgement moves the cursor). A permanent error in one partition (an
unknown symbol, times in another unit, an oversized answer) stops that partition only: it is
listed in the summary's `failed`, its progress stays where it was, and the other partitions go
on. Transient errors and bans end the backfill; its progress is kept for the rerun.

One backfill of a source runs at a time: a Redis lock held as a short lease and renewed by a
background thread (producers.produce.SourceLock), so a killed backfill frees its source within
seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sluice.producers.cursors import CursorStore, format_cursor
from sluice.producers.http_source import HttpSource
from sluice.producers.produce import SourceLock, publish_page
from sluice.producers.registry import open_source
from sluice.shared.context import Context
from sluice.shared.errors import SluiceError, SourceError


@dataclass
class BackfillSummary:
    source: str
    start: str
    end: str
    # complete | stopped (--max-windows, or `incomplete`) | partial (some partitions `failed`,
    # the others went on) | failed (every partition failed, no window went through) | skipped
    status: str
    windows_total: int = 0
    windows_done: int = 0  # including the ones done by earlier, interrupted runs
    windows_this_run: int = 0
    pages: int = 0
    records: int = 0
    rejected: int = 0  # items of the answers that are not records: sent as dead letters
    seconds: float = 0.0
    incomplete: list[str] = field(default_factory=list)  # partitions the API cut short
    # Partitions stopped by a permanent error: {"partition": ..., "error": ...}. Their progress
    # stays at the window that failed; the next run of the same backfill tries it again.
    failed: list[dict[str, str]] = field(default_factory=list)
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
    *,
    advance: Callable[[int, int, str], None] | None = None,
    run_id: str | None = None,
) -> BackfillSummary:
    """Enqueue every window of [start, end) not yet enqueued by an earlier run of the same
    backfill; stop after `max_windows` windows (None: all). Raises on a transient error or a
    ban (progress kept); a permanent error only stops its partition (`failed`).

    `say` gets messages; `advance(done, total, line)`, when given, gets the windows done so far
    (earlier runs' included) with a line describing the last one, instead of `say`. `run_id`
    names the pages' run (the console's backfill gives one back before it starts)."""
    t0 = time.perf_counter()
    summary = BackfillSummary(source, format_cursor(start), format_cursor(end), "complete")
    if end <= start:
        raise SluiceError("backfill: --to must be after --from", source=source)
    lock = SourceLock(ctx.redis, f"backfill:{source}")
    if not lock.acquire():
        summary.status, summary.error = "skipped", "another backfill of this source is active"
        return summary
    src: Any = None
    try:
        src = open_source(ctx.settings, source)
        if not isinstance(src, HttpSource):
            raise SluiceError("backfill is for HTTP API sources only", source=source)
        tell = say or (lambda _m: None)
        _backfill(
            ctx,
            src,
            start,
            end,
            tell,
            advance,
            max_windows,
            summary,
            lock,
            run_id or uuid.uuid4().hex,
        )
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
    advance: Callable[[int, int, str], None] | None,
    max_windows: int | None,
    summary: BackfillSummary,
    lock: SourceLock,
    run_id: str,
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
    if advance is not None:
        advance(summary.windows_done, summary.windows_total, "")
    stopped = False
    while plans and not stopped:
        for p in list(plans):
            w = next(plans[p], None)
            if w is None:
                del plans[p]
                continue
            if max_windows is not None and summary.windows_this_run >= max_windows:
                stopped = True  # this window is fetched by the next run
                break
            w_start, w_end, _ = w
            try:
                got = src.read_window(p, w_start, w_end)
            except SourceError as exc:
                if exc.transient:
                    raise  # a rerun continues from the progress stored so far
                del plans[p]  # its progress stays; the other partitions go on
                summary.failed.append({"partition": p, "error": str(exc)})
                say(f"{name}: {p} failed (the other partitions go on): {exc}")
                continue
            if got.complete_until < w_end:
                del plans[p]  # later windows would leave a gap: this partition stops here
                summary.incomplete.append(p)
                w_end = got.complete_until
            if w_end > w_start:
                ack = {
                    "partition": p,
                    "start": format_cursor(w_start),
                    "end": format_cursor(w_end),
                    "first": False,  # never creates a live cursor, only moves it forward
                }
                if got.rows or got.rejected:
                    # Ignored by live resume points: a backfill never makes a live run restart.
                    # Rejected items become dead letters; the acknowledgement waits for them.
                    last_key = [f"backfill:{p}", ack["end"]]
                    publish_page(ctx, stream, name, run_id, got.rows, ack, last_key, got.rejected)
                    summary.pages += 1
                    summary.records += len(got.rows)
                    summary.rejected += len(got.rejected)
                else:
                    src.acknowledge(ack)  # nothing to commit
                store.set(book, progress_key(p, start, end), w_end)
            summary.windows_done += 1
            summary.windows_this_run += 1
            if lock.lost:
                raise SluiceError(
                    "the backfill lost its lock (lease expired); stopped: run it again to continue",
                    source=name,
                )
            letters = f", {summary.rejected} dead letter(s)" if summary.rejected else ""
            line = (
                f"{name}: window {summary.windows_done}/{summary.windows_total} "
                f"({p} {format_cursor(w_start)}..{format_cursor(w_end)}), "
                f"{summary.pages} page(s), {summary.records} record(s){letters} enqueued"
            )
            if advance is not None:
                advance(summary.windows_done, summary.windows_total, line)
            else:
                say(line)
    problems = []
    if summary.failed:
        every = {f["partition"] for f in summary.failed} >= set(src.partitions())
        summary.status = "failed" if every and not summary.windows_this_run else "partial"
        problems.append(
            "failed: " + "; ".join(f"{f['partition']}: {f['error']}" for f in summary.failed)
        )
    elif summary.incomplete or stopped:
        summary.status = "stopped"
    if summary.incomplete:
        problems.append("the API stopped paging part-way for: " + ", ".join(summary.incomplete))
    if problems:
        summary.error = "; ".join(problems)

"""Steering sources: pause and resume, run now, reset a cursor, start a backfill and follow it.

The console and `sluice source` both work through these functions. A run started here is the
`sluice.produce` task with a run id given back at once; a backfill is the `sluice.backfill` task
(defined here, loaded by `sluice worker`), recorded in `source_runs` as a run of kind
"backfill" whose `detail` holds its windows done and total as it goes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from sluice.ops.backfill import BackfillSummary, parse_time, run_backfill
from sluice.producers.cursors import CursorStore, format_cursor
from sluice.producers.registry import HTTP_KINDS, open_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.controls import Control, controls, set_paused
from sluice.shared.errors import SluiceError
from sluice.shared.letters import text_field
from sluice.shared.state import StateStore, read_time

log = logging.getLogger("sluice.sources")


class SourceControlError(SluiceError):
    """What was asked of a source cannot be done to it."""


def _known(ctx: Context, name: str) -> Any:
    """The source's configuration; an unknown name raises, naming the known ones."""
    return ctx.settings.source(name)


def pause(ctx: Context, store: StateStore, name: str, reason: str | None = None) -> Control:
    """Pause the source: beat and `sluice produce` skip it, and say so, until it is resumed."""
    _known(ctx, name)
    set_paused(store, name, True, reason)
    return controls(store)[name]


def resume(ctx: Context, store: StateStore, name: str, reason: str | None = None) -> Control:
    """Let the source run again on its schedule."""
    _known(ctx, name)
    set_paused(store, name, False, reason)
    return controls(store)[name]


def _queued_run(ctx: Context, name: str, run_id: str, kind: str, detail: Any = None) -> None:
    """The run's row before a worker takes it, so it can be followed from the moment it is
    asked for; the worker's own record of the run replaces its status."""
    store = ctx.state
    streams = ",".join(ctx.settings.source(name).streams)[:200]
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO source_runs (run_id, source, stream, kind, started_at, status,"
                " detail) VALUES (:r, :s, :stream, :kind, :now, 'queued', :detail)"
            ),
            {
                "r": run_id,
                "s": name,
                "stream": streams,
                "kind": kind,
                "now": store.now(),
                "detail": None if detail is None else json.dumps(detail),
            },
        )


def run_now(ctx: Context, name: str) -> str:
    """Queue one run of the source now; its run id (see `ops.runs.show_run`). A paused source
    is refused: resume it first."""
    _known(ctx, name)
    control = controls(ctx.state).get(name)
    if control is not None and control.paused:
        why = f" ({control.reason})" if control.reason else ""
        raise SourceControlError(f"source {name!r} is paused{why}: resume it first", source=name)
    run_id = uuid.uuid4().hex
    _queued_run(ctx, name, run_id, "produce")
    app.send_task("sluice.produce", args=[name], kwargs={"run_id": run_id}, queue="produce")
    return run_id


def _http(ctx: Context, name: str, what: str) -> Any:
    cfg = _known(ctx, name)
    if cfg.kind not in HTTP_KINDS:
        raise SourceControlError(
            f"source {name!r} ({cfg.kind}) has no time cursor to {what}: only HTTP API"
            f" sources ({', '.join(sorted(HTTP_KINDS))}) read by time",
            source=name,
        )
    return cfg


@dataclass
class CursorReset:
    source: str
    to: datetime
    before: dict[str, str | None]  # each partition's cursor before the reset (None: none yet)


def reset_cursor(ctx: Context, name: str, to: datetime) -> CursorReset:
    """Put every partition's cursor of an HTTP source at `to`: its next run reads from there
    (less the lookback). Forward skips data; backward reads it again (the keyed writes absorb
    the repeats). Pages already in flight still commit; the next run no longer continues
    after them."""
    _http(ctx, name, "reset")
    to = to if to.tzinfo else to.replace(tzinfo=UTC)
    src: Any = open_source(ctx.settings, name)
    try:
        partitions = list(src.partitions())
    finally:
        src.close()
    store = CursorStore(ctx.state)
    old = store.get_all(name)
    before: dict[str, str | None] = {}
    for p in sorted({*partitions, *old}):
        before[p] = format_cursor(old[p]) if p in old else None
        store.set(name, p, to)
    ctx.progress.forget_resume(name)
    return CursorReset(name, to, before)


def start_backfill(ctx: Context, name: str, start: datetime, end: datetime) -> str:
    """Queue a backfill of [start, end) of an HTTP source; its run id. Follow it with
    `backfill_progress` (or `ops.runs.show_run`)."""
    _http(ctx, name, "backfill")
    start = start if start.tzinfo else start.replace(tzinfo=UTC)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    if end <= start:
        raise SourceControlError("a backfill's end must be after its start", source=name)
    run_id = uuid.uuid4().hex
    detail = {"from": format_cursor(start), "to": format_cursor(end)}
    _queued_run(ctx, name, run_id, "backfill", detail)
    app.send_task(
        "sluice.backfill",
        args=[name, format_cursor(start), format_cursor(end), run_id],
        queue="produce",
    )
    return run_id


@dataclass
class BackfillProgress:
    run_id: str
    source: str
    status: str  # queued, running, then the backfill's outcome: complete, stopped, partial, …
    start: str | None
    end: str | None
    windows_done: int
    windows_total: int
    pages: int
    records: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


def backfill_progress(store: StateStore, run_id: str) -> BackfillProgress:
    with store.read() as conn:
        r = conn.execute(
            text(
                "SELECT run_id, source, status, pages, records, error, detail, started_at,"
                " finished_at FROM source_runs WHERE run_id = :r AND kind = 'backfill'"
            ),
            {"r": run_id},
        ).first()
    if r is None:
        raise SourceControlError(f"no backfill with run id {run_id!r}")
    detail = json.loads(r.detail) if r.detail else {}
    return BackfillProgress(
        run_id=r.run_id,
        source=r.source,
        status=r.status,
        start=detail.get("from"),
        end=detail.get("to"),
        windows_done=int(detail.get("windows_done", 0)),
        windows_total=int(detail.get("windows_total", 0)),
        pages=int(r.pages),
        records=int(r.records),
        error=r.error,
        started_at=read_time(r.started_at),
        finished_at=read_time(r.finished_at),
    )


def _record_backfill(
    ctx: Context, run_id: str, status: str, detail: dict[str, Any], s: BackfillSummary | None
) -> None:
    store = ctx.state
    finished = status not in ("queued", "running")
    with store.write() as conn:
        conn.execute(
            text(
                "UPDATE source_runs SET status = :status, detail = :detail, pages = :pages,"
                " records = :records, error = :error, finished_at = :finished"
                " WHERE run_id = :r"
            ),
            {
                "r": run_id,
                "status": status,
                "detail": json.dumps(detail),
                "pages": s.pages if s else 0,
                "records": s.records if s else 0,
                "error": text_field(s.error, 2000) if s and s.error else None,
                "finished": store.now() if finished else None,
            },
        )


@app.task(name="sluice.backfill")
def backfill_task(source: str, start: str, end: str, run_id: str) -> dict[str, Any]:
    """A backfill started from the console or `sluice source backfill`."""
    ctx = app.context
    detail: dict[str, Any] = {"from": start, "to": end, "windows_done": 0, "windows_total": 0}
    _record_backfill(ctx, run_id, "running", detail, None)
    last = 0.0

    def advance(done: int, total: int, _line: str) -> None:
        nonlocal last
        detail.update(windows_done=done, windows_total=total)
        now = time.monotonic()
        if now - last >= 1.0 or done == total:  # a row update a second at most
            last = now
            try:
                _record_backfill(ctx, run_id, "running", detail, None)
            except Exception as exc:  # progress is for people; the backfill goes on
                log.warning("could not record backfill %s progress: %s", run_id, exc)

    try:
        s = run_backfill(
            ctx, source, parse_time(start), parse_time(end), advance=advance, run_id=run_id
        )
    except Exception as exc:
        failed = BackfillSummary(source, start, end, "failed", error=str(exc)[:2000])
        _record_backfill(ctx, run_id, "failed", detail, failed)
        raise
    detail.update(windows_done=s.windows_done, windows_total=s.windows_total)
    _record_backfill(ctx, run_id, s.status, detail, s)
    return s.as_dict()

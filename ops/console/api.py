"""The console's JSON API under /api/v1: the same data-layer functions the pages call
(ops/dlq.py, ops/runs.py, ops/sources.py, ops/status.py), documented by FastAPI's OpenAPI
description at /api/v1/openapi.json and the page /api/v1/docs.

State-changing routes are POST. A Bearer token authenticates without CSRF token; a session
cookie or basic auth needs the `X-CSRF-Token` header (the value of the `sluice_csrf` cookie).
Bulk changes take `dry_run`, true unless set false: the count comes first.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from sluice.ops import dlq, runs, sources
from sluice.ops.backfill import parse_time
from sluice.ops.console.app import Console, console_of, guard
from sluice.ops.console.overview import source_rows
from sluice.ops.console.pages_runs import before_key
from sluice.ops.console.selection import LetterSelection
from sluice.shared.controls import controls

API = "/api/v1"

router = APIRouter(prefix=API, dependencies=[Depends(guard)])
ConsoleDep = Annotated[Console, Depends(console_of)]


def selection_query(
    source: str | None = None,
    stream: str | None = None,
    sink: str | None = None,
    error_class: str | None = None,
    status: Annotated[str | None, Query(description="pending, replayed, discarded; '': any")] = (
        "pending"
    ),
    since: Annotated[str | None, Query(description="ISO-8601, or 30m/2h/7d ago")] = None,
    until: Annotated[str | None, Query(description="ISO-8601, or 30m/2h/7d ago")] = None,
    text: Annotated[str | None, Query(description="in the key, error class or message")] = None,
) -> LetterSelection:
    return LetterSelection(
        source=source,
        stream=stream,
        sink=sink,
        error_class=error_class,
        status=status,
        since=since,
        until=until,
        text=text,
        ids=None,
    )


SelectionDep = Annotated[LetterSelection, Depends(selection_query)]


class BulkAction(LetterSelection):
    dry_run: bool = Field(True, description="only count what would change (the default)")


class EditBody(BaseModel):
    record: dict[str, Any] = Field(description="the record's values by column name")


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> dict[str, Any]:
    """The OpenAPI description, behind the same credentials as the rest of the API."""
    schema: dict[str, Any] = request.app.openapi()
    return schema


# -- status ------------------------------------------------------------------------------------


@router.get("/status", summary="The pipeline's state: `sluice status --json`")
def status(console: ConsoleDep) -> dict[str, Any]:
    return console.status().as_dict()


@router.get("/stats", summary="Rows per sink table, schema versions, records per minute")
def stats(console: ConsoleDep) -> dict[str, Any]:
    return console.stats().as_dict()


# -- dead letters ------------------------------------------------------------------------------


@router.get("/letters", summary="One page of dead letters, newest first")
def letters(
    console: ConsoleDep,
    selection: SelectionDep,
    after_id: Annotated[int | None, Query(description="the previous page's next_after_id")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    page = dlq.page_letters(console.store, selection.filters(after_id), limit)
    return {"letters": page.rows, "next_after_id": page.next_after_id}


@router.get("/letters/count", summary="How many dead letters the filters select")
def letters_count(console: ConsoleDep, selection: SelectionDep) -> dict[str, int]:
    return {"count": dlq.count_letters(console.store, selection.filters())}


@router.get("/letters/groups", summary="Dead letters counted per error class")
def letter_groups(console: ConsoleDep, selection: SelectionDep) -> dict[str, Any]:
    groups = dlq.error_groups(console.store, selection.filters())
    return {"groups": [asdict(g) for g in groups]}


@router.get("/letters/{letter_id}", summary="One dead letter: its record and full error")
def letter(console: ConsoleDep, letter_id: int) -> dict[str, Any]:
    return dlq.show_letter(console.store, letter_id)


@router.post("/letters/replay", summary="Replay the selected letters (dry run by default)")
def replay(console: ConsoleDep, body: BulkAction) -> dict[str, Any]:
    result = dlq.replay(console.ctx, body.filters(), dry_run=body.dry_run)
    return {"dry_run": body.dry_run, **asdict(result)}


@router.post("/letters/discard", summary="Discard the selected letters (dry run by default)")
def discard(console: ConsoleDep, body: BulkAction) -> dict[str, Any]:
    count = dlq.discard(console.store, body.filters(), dry_run=body.dry_run)
    return {"dry_run": body.dry_run, "discarded": count}


@router.post("/letters/{letter_id}/refetch", summary="Read the record again from its source")
def refetch(console: ConsoleDep, letter_id: int) -> dict[str, Any]:
    return asdict(dlq.refetch(console.ctx, [letter_id]))


@router.post("/letters/{letter_id}/edit", summary="Queue an edited record for the letter")
def edit(console: ConsoleDep, letter_id: int, body: EditBody) -> dict[str, Any]:
    return asdict(dlq.edit(console.ctx, letter_id, body.record))


# -- runs --------------------------------------------------------------------------------------


@router.get("/runs", summary="Runs, newest first (keyset pages)")
def run_list(
    console: ConsoleDep,
    source: str | None = None,
    status: Annotated[str | None, Query(description=", ".join(runs.RUN_STATUSES))] = None,
    kind: Annotated[str | None, Query(description="produce or backfill")] = None,
    before_at: Annotated[str | None, Query(description="next_before[0] of the last page")] = None,
    before_id: Annotated[str | None, Query(description="next_before[1] of the last page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    page = runs.list_runs(
        console.store,
        runs.RunFilters(
            source=source or None,
            status=status or None,
            kind=kind or None,
            before=before_key(before_at, before_id),
            limit=limit,
        ),
    )
    return {"runs": page.rows, "next_before": page.next_before}


@router.get("/runs/latest", summary="The latest run of each source")
def run_latest(console: ConsoleDep) -> dict[str, Any]:
    return {"runs": runs.latest_runs(console.store)}


@router.get("/runs/{run_id}", summary="One run: its pages, their outcomes and dead letters")
def run_detail(console: ConsoleDep, run_id: str) -> dict[str, Any]:
    return asdict(runs.show_run(console.store, run_id))


# -- sources -----------------------------------------------------------------------------------


class PauseBody(BaseModel):
    reason: str | None = Field(None, description="why, shown to other operators")


class ResetBody(BaseModel):
    to: str = Field(description="ISO-8601 time every partition's cursor is set to")
    confirm: bool = Field(False, description="must be true: the reset moves the next run")


class BackfillBody(BaseModel):
    start: str = Field(description="ISO-8601 start of the range (included)")
    end: str = Field(description="ISO-8601 end of the range (excluded)")


def _iso(field: str, value: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError:
        raise HTTPException(422, f"{field}: not an ISO-8601 time: {value!r}") from None


@router.get("/sources", summary="Each source: kind, mode, schedule, paused, latest run")
def source_list(console: ConsoleDep) -> dict[str, Any]:
    latest = runs.latest_runs(console.store)
    rows = source_rows(console, None, controls(console.store))
    return {
        "sources": {
            s.name: {
                "kind": s.kind,
                "mode": s.mode,
                "stream": s.stream,
                "schedule": s.schedule,
                "paused": s.paused is not None,
                "paused_reason": s.paused.reason if s.paused else None,
                "latest_run": latest.get(s.name),
            }
            for s in rows
        }
    }


@router.post("/sources/{name}/pause", summary="Pause: beat and `sluice produce` skip it")
def source_pause(console: ConsoleDep, name: str, body: PauseBody | None = None) -> dict[str, Any]:
    control = sources.pause(console.ctx, console.store, name, body.reason if body else None)
    return asdict(control)


@router.post("/sources/{name}/resume", summary="Resume a paused source")
def source_resume(console: ConsoleDep, name: str) -> dict[str, Any]:
    return asdict(sources.resume(console.ctx, console.store, name))


@router.post("/sources/{name}/run", summary="Run the source now; its run id")
def source_run(console: ConsoleDep, name: str) -> dict[str, str]:
    run_id = sources.run_now(console.ctx, name)
    return {"run_id": run_id, "run": f"{API}/runs/{run_id}"}


@router.post("/sources/{name}/reset", summary="Reset an HTTP source's cursors to a time")
def source_reset(console: ConsoleDep, name: str, body: ResetBody) -> dict[str, Any]:
    if not body.confirm:
        raise HTTPException(400, 'a cursor reset must be confirmed: send "confirm": true')
    return asdict(sources.reset_cursor(console.ctx, name, _iso("to", body.to)))


@router.post("/sources/{name}/backfill", summary="Start a backfill of a range; its run id")
def source_backfill(console: ConsoleDep, name: str, body: BackfillBody) -> dict[str, str]:
    run_id = sources.start_backfill(
        console.ctx, name, _iso("start", body.start), _iso("end", body.end)
    )
    return {"run_id": run_id, "progress": f"{API}/backfills/{run_id}"}


@router.get("/backfills/{run_id}", summary="A backfill's progress: windows done of total")
def backfill(console: ConsoleDep, run_id: str) -> dict[str, Any]:
    return asdict(sources.backfill_progress(console.store, run_id))

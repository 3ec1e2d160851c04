"""The run pages: the history of runs (filters, keyset pages), the latest run of each source,
and one run with its pages, their outcomes and their dead letters."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse

from sluice.ops import runs
from sluice.ops.console.app import console_of, guard
from sluice.ops.console.web import render
from sluice.ops.sources import backfill_progress

router = APIRouter(include_in_schema=False, dependencies=[Depends(guard)])

PAGE_SIZE = 50
UNFINISHED = ("queued", "running")


def before_key(at: str | None, run_id: str | None) -> tuple[datetime, str] | None:
    """A page's `next_before` from the query string (`before_at`, `before_id`)."""
    if not at or not run_id:
        return None
    try:
        return datetime.fromisoformat(at), run_id
    except ValueError:
        raise HTTPException(422, f"before_at: not an ISO time: {at!r}") from None


@router.get("/runs")
def run_list(
    request: Request,
    source: str = "",
    status: str = "",
    kind: str = "",
    before_at: str | None = None,
    before_id: str | None = None,
) -> HTMLResponse:
    console = console_of(request)
    filters = runs.RunFilters(
        source=source or None,
        status=status or None,
        kind=kind or None,
        before=before_key(before_at, before_id),
        limit=PAGE_SIZE,
    )
    page = runs.list_runs(console.store, filters)
    return render(
        request,
        "runs.html",
        page=page,
        source=source,
        status=status,
        kind=kind,
        first=filters.before is None,
        sources=sorted(console.ctx.settings.sources),
        statuses=runs.RUN_STATUSES,
        kinds=runs.RUN_KINDS,
    )


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str) -> HTMLResponse:
    console = console_of(request)
    detail = runs.show_run(console.store, run_id)
    progress = None
    if detail.run.get("kind") == "backfill":
        progress = backfill_progress(console.store, run_id)
    unfinished = detail.run.get("status") in UNFINISHED
    context = {"refresh": 2} if unfinished else {}
    return render(request, "run.html", detail=detail, progress=progress, **context)

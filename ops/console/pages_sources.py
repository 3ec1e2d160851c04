"""The sources page: each source with its schedule, pause state and latest run, and the
operator's controls: run now, pause and resume, reset a cursor (confirmed first), backfill."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sluice.ops import runs, sources
from sluice.ops.backfill import parse_time
from sluice.ops.console.app import console_of, guard
from sluice.ops.console.overview import source_rows
from sluice.ops.console.web import render
from sluice.producers.registry import HTTP_KINDS
from sluice.shared.controls import controls

router = APIRouter(include_in_schema=False, dependencies=[Depends(guard)])

_DONE = {
    "pause": "Paused {source}: beat and `sluice produce` skip it until it is resumed.",
    "resume": "Resumed {source}: it runs on its schedule again.",
    "reset": "Reset the cursors of {source}: its next run reads from there.",
}


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _time(field: str, value: str) -> str:
    """An ISO time from a form, checked; the text as given."""
    try:
        parse_time(value)
    except ValueError:
        raise HTTPException(422, f"{field}: not an ISO-8601 time: {value!r}") from None
    return value


@router.get("/sources")
def source_list(request: Request, done: str = "", source: str = "") -> HTMLResponse:
    console = console_of(request)
    rows = source_rows(console, None, controls(console.store))
    latest = runs.latest_runs(console.store)
    notice = _DONE[done].format(source=source) if done in _DONE and source else None
    return render(
        request,
        "sources.html",
        sources=rows,
        latest=latest,
        notice=notice,
        cursored=HTTP_KINDS,
    )


@router.post("/sources/{name}/run")
def run_now(request: Request, name: str) -> Response:
    run_id = sources.run_now(console_of(request).ctx, name)
    return _see_other(f"/runs/{run_id}")


@router.post("/sources/{name}/pause")
def pause(request: Request, name: str, reason: Annotated[str, Form()] = "") -> Response:
    console = console_of(request)
    sources.pause(console.ctx, console.store, name, reason.strip() or None)
    return _see_other(f"/sources?{urlencode({'done': 'pause', 'source': name})}")


@router.post("/sources/{name}/resume")
def resume(request: Request, name: str) -> Response:
    console = console_of(request)
    sources.resume(console.ctx, console.store, name)
    return _see_other(f"/sources?{urlencode({'done': 'resume', 'source': name})}")


@router.post("/sources/{name}/reset")
def reset(
    request: Request,
    name: str,
    to: Annotated[str, Form()],
    confirm: Annotated[str, Form()] = "",
) -> Response:
    """Without `confirm`: the confirmation page. With it: the reset."""
    console = console_of(request)
    _time("to", to)
    if confirm != "yes":
        console.ctx.settings.source(name)  # an unknown source is refused before asking
        return render(request, "reset.html", source=name, to=to)
    sources.reset_cursor(console.ctx, name, parse_time(to))
    return _see_other(f"/sources?{urlencode({'done': 'reset', 'source': name})}")


@router.post("/sources/{name}/backfill")
def backfill(
    request: Request,
    name: str,
    start: Annotated[str, Form()],
    end: Annotated[str, Form()],
) -> Response:
    run_id = sources.start_backfill(
        console_of(request).ctx,
        name,
        parse_time(_time("start", start)),
        parse_time(_time("end", end)),
    )
    return _see_other(f"/runs/{run_id}")

"""The dead-letter pages: filters, groups per error class, one letter, and the bulk actions.

Every bulk change goes through two steps: the form asks for a dry run (`/letters/confirm`: the
count that would change, and a button to go on), then the confirmed form does it
(`/letters/apply`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sluice.ops import dlq
from sluice.ops.console.app import console_of, guard
from sluice.ops.console.selection import from_mapping
from sluice.ops.console.web import render
from sluice.shared.errors import SluiceError

router = APIRouter(include_in_schema=False, dependencies=[Depends(guard)])

PAGE_SIZE = 50
ACTIONS = ("replay", "discard")


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


_DONE = {
    "replay": "Replayed {n} dead letter(s): their records are queued again.",
    "discard": "Discarded {n} dead letter(s).",
    "refetch": "Re-read the record from its source and queued it.",
    "edit": "Queued the edited record.",
}


@router.get("/letters")
def letters(request: Request, after_id: int | None = None) -> HTMLResponse:
    console = console_of(request)
    selection = from_mapping(request.query_params)
    filters = selection.filters(after_id)
    page = dlq.page_letters(console.store, filters, PAGE_SIZE)
    groups = dlq.error_groups(console.store, filters)
    done = request.query_params.get("done")
    notice = None
    if done in _DONE:
        notice = _DONE[done].format(n=int(request.query_params.get("n") or 0))
    settings = console.ctx.settings
    return render(
        request,
        "letters.html",
        selection=selection,
        page=page,
        groups=groups,
        total=sum(g.count for g in groups),
        after_id=after_id,
        notice=notice,
        statuses=dlq.STATUSES,
        sources=sorted(settings.sources),
        streams=sorted(settings.streams),
        sinks=[*settings.sinks_used, "source"],
        query=selection.query(),
        group_query=lambda cls: selection.model_copy(update={"error_class": cls}).query(),
    )


async def _action_form(request: Request) -> tuple[str, Any]:
    form = await request.form()
    action = str(form.get("action") or "")
    if action not in ACTIONS:
        raise HTTPException(400, f"unknown action {action!r}: replay or discard")
    return action, from_mapping(form)


@router.post("/letters/confirm")
async def confirm(request: Request) -> HTMLResponse:
    """The dry run: what the bulk action would change, and the button that does it."""
    action, selection = await _action_form(request)
    console = console_of(request)
    filters = selection.filters()
    if action == "replay":
        result = dlq.replay(console.ctx, filters, dry_run=True)
        count, skipped = result.records, result.skipped
    else:
        count, skipped = dlq.discard(console.store, filters, dry_run=True), 0
    return render(
        request,
        "confirm.html",
        action=action,
        selection=selection,
        count=count,
        skipped=skipped,
        fields=[(k, v) for k, v in selection.model_dump().items() if k != "ids" and v],
        ids=" ".join(map(str, selection.ids or [])),
        back=f"/letters?{selection.query()}",
    )


@router.post("/letters/apply")
async def apply(request: Request) -> Response:
    action, selection = await _action_form(request)
    console = console_of(request)
    filters = selection.filters()
    if action == "replay":
        n = dlq.replay(console.ctx, filters).records
    else:
        n = dlq.discard(console.store, filters)
    if selection.ids and len(selection.ids) == 1:
        return _see_other(f"/letters/{selection.ids[0]}?{urlencode({'done': action, 'n': n})}")
    return _see_other(f"/letters?{selection.query(done=action, n=n)}")


def _letter_page(
    request: Request,
    found: dict[str, Any],
    *,
    editable: str | None = None,
    notice: str | None = None,
    problem: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """A letter's page: its record as {column: value} when it is one (else as stored), and an
    edit form holding those values (or what the operator typed, when it was refused)."""
    values = dlq.record_values(found)
    record = found.pop("record", None)
    if editable is None and values:
        editable = json.dumps(values, indent=2, ensure_ascii=False, default=str)
    return render(
        request,
        "letter.html",
        status_code=status_code,
        letter=found,
        record=values or record,
        editable=editable,
        notice=notice,
        problem=problem,
    )


@router.get("/letters/{letter_id}")
def letter(request: Request, letter_id: int, done: str | None = None) -> HTMLResponse:
    found = dlq.show_letter(console_of(request).store, letter_id)
    return _letter_page(request, found, notice=_DONE.get(done or "", "").format(n=1) or None)


@router.post("/letters/{letter_id}/refetch")
def refetch(request: Request, letter_id: int) -> Response:
    result = dlq.refetch(console_of(request).ctx, [letter_id])
    if letter_id not in result.refetched:
        why = [f"the source has no record with key {m['key']!r}" for m in result.missing]
        why += [f"the record read again is refused: {i['error']}" for i in result.invalid]
        detail = "; ".join(why) or "nothing to re-read"
        raise HTTPException(409, f"could not re-fetch letter {letter_id}: {detail}")
    return _see_other(f"/letters/{letter_id}?done=refetch")


@router.post("/letters/{letter_id}/edit")
def edit(request: Request, letter_id: int, record: Annotated[str, Form()]) -> Response:
    console = console_of(request)
    try:
        values = json.loads(record)
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object of column: value")
        dlq.edit(console.ctx, letter_id, values)
    except (ValueError, SluiceError) as exc:
        found = dlq.show_letter(console.store, letter_id)
        return _letter_page(request, found, editable=record, problem=str(exc), status_code=422)
    return _see_other(f"/letters/{letter_id}?done=edit")

"""The dead-letter task: store a page's dead letters in `failed_ingestions`, then let its
source's progress move.

A page that left dead letters is acknowledged to its source (D1 rows marked, a cursor moved) only
after those letters are stored: the ingest task (or the producer, for items a source could not
read) holds the page with a `letters:<sink>` member in its pending set (shared/progress.py), and
this task releases it once the letters are in the state store (shared/letters.py). If the store is
down or refuses even a letter's fallback form, the message is retried and waits on the
`dead_letter` queue, visible in `sluice status`, with the page still unacknowledged: a letter is
never dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from sluice.shared.celery_app import app
from sluice.shared.letters import DeadLetter, write_letters

log = logging.getLogger("sluice.dead_letter")

MAX_RETRY_DELAY = 300  # seconds between attempts once the store has failed for a while


@app.task(
    name="sluice.dead_letter",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def dead_letter(
    self: Task,
    letters: list[dict[str, Any]],
    page_id: str | None = None,
    member: str | None = None,
) -> int:
    ctx = app.context
    try:
        stored = write_letters(ctx.state, [DeadLetter.from_message(d) for d in letters])
    except Exception as exc:
        # Whatever the cause, the letters must not be dropped: they wait here, retried.
        delay = min(MAX_RETRY_DELAY, 2 ** min(self.request.retries, 9))
        log.warning(
            "%d dead letters wait: the %s store failed (%s); retry in %ss",
            len(letters),
            ctx.state.name,
            exc,
            delay,
        )
        raise self.retry(exc=exc, countdown=delay) from exc
    if page_id and member and ctx.progress.committed(page_id, member):
        app.send_task("sluice.ack_page", args=[_source_of(ctx, page_id), page_id])
    return stored


def _source_of(ctx: Any, page_id: str) -> str:
    found = ctx.progress.ack_data(page_id)
    return found[0] if found else ""

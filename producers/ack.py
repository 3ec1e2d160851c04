"""Acknowledge a page to its source once every sink has committed it (D1: set processed_at).

Done by the ingest task of the last sink to commit, in the same process (a Celery task per page
cost a publish, a delivery and three events); an ingest whose own attempt failed sends it as the
`sluice.ack_page` task instead. If the acknowledgement fails it is retried; if it is lost, the
rows stay unprocessed and are read again after the in-flight lease: a duplicate delivery the
sinks absorb, never a loss.
"""

from __future__ import annotations

import logging

from celery import Task

from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.errors import SluiceError

log = logging.getLogger("sluice.ack")


def acknowledge_page(ctx: Context, source_name: str, page_id: str) -> str:
    """Mark the page's rows processed at its source, once; raises SluiceError on failure."""
    found = ctx.progress.ack_data(page_id)
    if found is None:
        return "already acknowledged"
    _, ack = found
    source = ctx.source(source_name, lambda: open_source(ctx.settings, source_name))
    try:
        source.acknowledge(ack)
    except SluiceError:
        ctx.drop_source(source_name, source)  # reopen next time: the connection may be broken
        raise
    ctx.progress.done(source_name, page_id)
    return "acknowledged"


@app.task(
    name="sluice.ack_page", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=20
)
def ack_page(self: Task, source_name: str, page_id: str) -> str:
    try:
        return acknowledge_page(app.context, source_name, page_id)
    except SluiceError as exc:
        delay = min(300, 2 ** min(self.request.retries, 8))
        log.warning(
            "ack of page %s to %s failed (%s); retry in %ss", page_id, source_name, exc, delay
        )
        raise self.retry(exc=exc, countdown=delay) from exc

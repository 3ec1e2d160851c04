"""The acknowledgement task, on the `progress` queue: acknowledge a page to its source when the
process that finished it could not (its own attempt failed, or the page waited for its dead
letters). Retried with backoff; see shared/acknowledge.py."""

from __future__ import annotations

import logging

from celery import Task

from sluice.shared.acknowledge import acknowledge_page
from sluice.shared.celery_app import app
from sluice.shared.errors import SluiceError

log = logging.getLogger("sluice.ack")


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

"""Acknowledge a page to its source once every sink has committed it and its dead letters are
stored (D1: set processed_at; an HTTP source: move its cursor).

Done in the process that finished the page last: the ingest task of the last sink (a Celery task
per page would cost a publish, a delivery and three events), or the dead-letter task's follow-up
`sluice.ack_page` (consumers/ack.py). If the acknowledgement fails it is retried; if it is lost,
the rows stay unprocessed and are read again after the in-flight lease: a duplicate delivery the
sinks absorb, never a loss.
"""

from __future__ import annotations

from sluice.shared.context import Context
from sluice.shared.errors import SluiceError


def acknowledge_page(ctx: Context, source_name: str, page_id: str) -> str:
    """Mark the page's rows processed at its source, once; raises SluiceError on failure."""
    found = ctx.progress.ack_data(page_id)
    if found is None:
        return "already acknowledged"
    _, ack = found
    source = ctx.source(source_name)
    try:
        source.acknowledge(ack)
    except SluiceError:
        ctx.drop_source(source_name, source)  # reopen next time: the connection may be broken
        raise
    ctx.progress.done(source_name, page_id)
    return "acknowledged"

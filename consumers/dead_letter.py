"""Dead letters: records that cannot be written, kept with the reason for an operator to replay.

The ingest task sends one message per page holding all of its dead letters; this consumer writes
them in bulk into `failed_ingestions` (in the state database, PostgreSQL), keyed by
(stream, sink, record key) so a redelivered message changes nothing. If the database is down the
message is retried and waits on the `dead_letter` queue: never dropped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import psycopg2
from celery import Task

from shared.celery_app import app
from shared.database import libpq_dsn

log = logging.getLogger("sluice.dead_letter")

_UPSERT = """
INSERT INTO failed_ingestions AS f
    (stream, sink, record_key, source, page_id, payload, error_class, error_message)
VALUES %s
ON CONFLICT (stream, sink, record_key) DO UPDATE SET
    source = EXCLUDED.source,
    page_id = EXCLUDED.page_id,
    payload = EXCLUDED.payload,
    error_class = EXCLUDED.error_class,
    error_message = EXCLUDED.error_message,
    last_failed_at = now(),
    -- A record failing again after a replay comes back as pending with its count raised;
    -- a redelivery of the same failure while pending changes nothing but the time.
    attempts = CASE WHEN f.status = 'pending' THEN f.attempts ELSE f.attempts + 1 END,
    status = 'pending'
"""


@dataclass(frozen=True)
class DeadLetter:
    stream: str
    sink: str
    record_key: str
    source: str
    page_id: str
    payload: dict[str, Any]
    error_class: str
    error_message: str


def send_dead_letters(letters: list[DeadLetter]) -> None:
    app.send_task("sluice.dead_letter", args=[[asdict(d) for d in letters]])


def _payload_json(payload: dict[str, Any]) -> str:
    text = orjson.dumps(payload, default=repr).decode()
    # jsonb cannot hold NUL: keep the evidence readable instead of failing the write.
    return text.replace("\\u0000", "\\\\u0000")


def write_dead_letters(dsn: str, letters: list[dict[str, Any]]) -> int:
    from psycopg2.extras import execute_values

    # One row per key within the batch (the last wins), sorted to avoid lock-order deadlocks.
    unique = {(d["stream"], d["sink"], d["record_key"]): d for d in letters}
    rows = [
        (
            d["stream"],
            d["sink"],
            d["record_key"],
            d["source"],
            d["page_id"],
            _payload_json(d["payload"]),
            d["error_class"],
            d["error_message"][:10_000],
        )
        for _, d in sorted(unique.items())
    ]
    conn = psycopg2.connect(dsn, connect_timeout=10, application_name="sluice-dead-letter")
    try:
        with conn, conn.cursor() as cur:
            execute_values(cur, _UPSERT, rows, page_size=500)
    finally:
        conn.close()
    return len(rows)


@app.task(
    name="sluice.dead_letter",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def dead_letter(self: Task, letters: list[dict[str, Any]]) -> int:
    ctx = app.context
    try:
        return write_dead_letters(libpq_dsn(ctx.postgres_url), letters)
    except psycopg2.OperationalError as exc:
        delay = min(60, 2 ** min(self.request.retries, 6))
        log.warning("dead letters wait: state database unreachable (%s); retry in %ss", exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc

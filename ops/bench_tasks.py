"""The naive baseline for `sluice bench`: one Celery task per record, one INSERT each.

What a user would write without Sluice. Loaded only by bench workers (`--include`).
"""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions

from sluice.shared.celery_app import app
from sluice.shared.database import libpq_dsn

_conn: dict[str, psycopg2.extensions.connection] = {}

_INSERT = (
    "INSERT INTO usage_events (id, organisation_id, project_id, idempotency_key, metric_name,"
    ' metric_value, unit, "timestamp", metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)'
    " ON CONFLICT DO NOTHING"
)


@app.task(name="sluice.bench.naive_insert", acks_late=True)
def naive_insert(row: list[Any]) -> None:
    dsn = libpq_dsn(app.context.postgres_url)
    conn = _conn.get(dsn)
    if conn is None or conn.closed:
        conn = _conn[dsn] = psycopg2.connect(dsn)
        conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(_INSERT, row)

"""`sluice dlq`: list, show, replay and discard dead letters in `failed_ingestions`.

Replay re-enqueues the selected records as pages on their sink's queue and marks them `replayed`;
the sinks' keyed writes make a replay idempotent (replaying twice never duplicates). A replayed
record that fails again comes back as `pending` with its attempt count raised
(consumers/dead_letter.py).
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.celery_app import send_page
from shared.context import Context
from shared.errors import SluiceError
from shared.page import Page

STATUSES = ("pending", "replayed", "discarded")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")


@dataclass
class Filters:
    ids: list[int] | None = None
    stream: str | None = None
    sink: str | None = None
    error: str | None = None  # substring of the error class or message
    source: str | None = None
    since: str | None = None  # ISO-8601 time, or relative: 30m, 2h, 7d
    status: str | None = "pending"
    limit: int | None = None


def _since(value: str) -> datetime:
    m = _RELATIVE.match(value)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise SluiceError(f"--since: expected an ISO time or 30m/2h/7d, got {value!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _where(f: Filters) -> tuple[str, dict[str, Any]]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if f.ids:
        clauses.append("id = ANY(:ids)")
        params["ids"] = list(f.ids)
    for col in ("stream", "sink", "source"):
        value = getattr(f, col)
        if value:
            clauses.append(f"{col} = :{col}")
            params[col] = value
    if f.error:
        clauses.append("(error_class ILIKE :error OR error_message ILIKE :error)")
        params["error"] = f"%{f.error}%"
    if f.since:
        clauses.append("last_failed_at >= :since")
        params["since"] = _since(f.since)
    if f.status:
        if f.status not in STATUSES:
            raise SluiceError(f"--status: expected one of {', '.join(STATUSES)}, got {f.status!r}")
        clauses.append("status = :status")
        params["status"] = f.status
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def list_letters(engine: Engine, f: Filters) -> list[dict[str, Any]]:
    where, params = _where(f)
    limit = f" LIMIT {int(f.limit)}" if f.limit else ""
    sql = (
        "SELECT id, stream, sink, record_key, source, error_class, error_message, attempts,"
        " status, replay_count, first_failed_at, last_failed_at FROM failed_ingestions"
        f"{where} ORDER BY id{limit}"
    )
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def show_letter(engine: Engine, letter_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM failed_ingestions WHERE id = :id"), {"id": letter_id}
        ).one_or_none()
    if row is None:
        raise SluiceError(f"no dead letter with id {letter_id}")
    return dict(row._mapping)


def discard(engine: Engine, f: Filters) -> int:
    where, params = _where(f)
    with engine.begin() as conn:
        return int(
            conn.execute(
                text(f"UPDATE failed_ingestions SET status = 'discarded'{where}"), params
            ).rowcount
        )


@dataclass
class ReplayResult:
    records: int
    pages: int
    skipped: int  # letters that hold no replayable record (an unreadable message)


def replay(ctx: Context, f: Filters, dry_run: bool = False) -> ReplayResult:
    """Re-enqueue the selected dead letters as pages; mark them replayed."""
    where, params = _where(f)
    limit = f" LIMIT {int(f.limit)}" if f.limit else ""
    page_size = ctx.settings.pipeline.page_size
    with ctx.state.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT id, stream, sink, source, payload FROM failed_ingestions"
                f"{where} ORDER BY id{limit} FOR UPDATE SKIP LOCKED"
            ),
            params,
        ).all()
        groups: dict[tuple[str, str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        skipped = 0
        for r in rows:
            if r.stream not in ctx.settings.streams or "_message" in r.payload:
                skipped += 1
                continue
            groups[(r.stream, r.sink, r.source)].append((r.id, r.payload))
        pages = records = 0
        run = f"replay-{uuid.uuid4().hex[:12]}"
        for (stream_name, sink, source), items in groups.items():
            stream = ctx.settings.stream(stream_name)
            columns = list(stream.column_names)
            for i in range(0, len(items), page_size):
                chunk = items[i : i + page_size]
                page = Page(
                    uuid.uuid4().hex,
                    stream_name,
                    sink,
                    source,
                    run,
                    columns,
                    [[p.get(c) for c in columns] for _, p in chunk],
                )
                if not dry_run:
                    send_page(page)
                    conn.execute(
                        text(
                            "UPDATE failed_ingestions SET status = 'replayed',"
                            " replay_count = replay_count + 1 WHERE id = ANY(:ids)"
                        ),
                        {"ids": [i for i, _ in chunk]},
                    )
                pages += 1
                records += len(chunk)
        if dry_run:
            conn.rollback()
    return ReplayResult(records, pages, skipped)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no dead letters match"
    head = (
        f"{'id':>6}  {'stream':<16}{'sink':<9}{'status':<10}{'tries':>5}  "
        f"{'last failure':<20}{'key':<26}error"
    )
    out = [head]
    for r in rows:
        when = r["last_failed_at"].strftime("%Y-%m-%d %H:%M:%S")
        err = f"{r['error_class']}: {r['error_message']}"
        out.append(
            f"{r['id']:>6}  {r['stream']:<16}{r['sink']:<9}{r['status']:<10}"
            f"{r['attempts']:>5}  {when:<20}{r['record_key'][:24]:<26}{err[:80]}"
        )
    return "\n".join(out)

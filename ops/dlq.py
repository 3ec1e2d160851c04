"""`sluice dlq`: list, show, replay and discard dead letters in `failed_ingestions`.

Replay re-enqueues the selected records, exactly as they arrived (the letter's `record`, with
their source order), as pages on their sink's queue, and marks them `replayed`; the sinks' keyed
writes make a replay idempotent (replaying twice never duplicates). A replayed record that fails
again comes back as `pending` with its attempt count raised (shared/letters.py). Letters of items
a source could not read (sink "source") and unreadable messages hold no record to replay.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from sluice.shared.celery_app import send_page
from sluice.shared.context import Context
from sluice.shared.errors import SluiceError
from sluice.shared.letters import SOURCE_SINK, decode_record, fetch_records
from sluice.shared.page import Page
from sluice.shared.state import StateStore

STATUSES = ("pending", "replayed", "discarded")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")


class UnknownLettersError(SluiceError):
    """Dead letter ids that do not exist were named."""


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


def since_time(value: str) -> datetime:
    """The time a `--since` value names: an ISO-8601 time (UTC if naive), or 30m/2h/7d ago."""
    m = _RELATIVE.match(value)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise SluiceError(f"--since: expected an ISO time or 30m/2h/7d, got {value!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _where(store: StateStore, f: Filters) -> tuple[str, dict[str, Any], list[Any]]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    binds: list[Any] = []
    if f.ids:
        clauses.append("id IN :ids")
        params["ids"] = list(f.ids)
        binds.append(bindparam("ids", expanding=True))
    for col in ("stream", "sink", "source"):
        value = getattr(f, col)
        if value:
            clauses.append(f"{col} = :{col}")
            params[col] = value
    if f.error:
        either = [store.contains(c, "error") for c in ("error_class", "error_message")]
        clauses.append(f"({either[0]} OR {either[1]})")
        params["error"] = f"%{f.error}%"
    if f.since:
        clauses.append("last_failed_at >= :since")
        params["since"] = store.ts(since_time(f.since))
    if f.status:
        if f.status not in STATUSES:
            raise SluiceError(f"--status: expected one of {', '.join(STATUSES)}, got {f.status!r}")
        clauses.append("status = :status")
        params["status"] = f.status
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params, binds


def _query(store: StateStore, sql: str, f: Filters) -> tuple[Any, dict[str, Any]]:
    where, params, binds = _where(store, f)
    statement = text(sql.format(where=where))
    return (statement.bindparams(*binds) if binds else statement), params


def check_ids(store: StateStore, ids: list[int] | None) -> None:
    """Raise naming the ids that do not exist (an operator's typo must not pass as "0 done")."""
    if not ids:
        return
    with store.read() as conn:
        found = {
            int(r[0])
            for r in conn.execute(
                text("SELECT id FROM failed_ingestions WHERE id IN :ids").bindparams(
                    bindparam("ids", expanding=True)
                ),
                {"ids": list(ids)},
            )
        }
    missing = sorted(set(ids) - found)
    if missing:
        raise UnknownLettersError(
            "no dead letter with id " + ", ".join(map(str, missing)) + " (see `sluice dlq list`)"
        )


def list_letters(store: StateStore, f: Filters) -> list[dict[str, Any]]:
    limit = f" LIMIT {int(f.limit)}" if f.limit else ""
    statement, params = _query(
        store,
        "SELECT id, stream, sink, record_key, source, error_class, error_message, attempts,"
        " status, replay_count, first_failed_at, last_failed_at FROM failed_ingestions"
        "{where} ORDER BY id" + limit,
        f,
    )
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(statement, params)]


def show_letter(store: StateStore, letter_id: int) -> dict[str, Any]:
    """Every column of one letter; `record` decoded: the record exactly as it arrived."""
    with store.read() as conn:
        row = conn.execute(
            text("SELECT * FROM failed_ingestions WHERE id = :id"), {"id": letter_id}
        ).one_or_none()
    if row is None:
        raise UnknownLettersError(f"no dead letter with id {letter_id} (see `sluice dlq list`)")
    out = dict(row._mapping)
    if out.get("record") is not None:
        out["record"] = decode_record(bytes(out["record"]))
    return out


def discard(store: StateStore, f: Filters) -> int:
    check_ids(store, f.ids)
    statement, params = _query(store, "UPDATE failed_ingestions SET status = 'discarded'{where}", f)
    with store.write() as conn:
        return int(conn.execute(statement, params).rowcount)


@dataclass
class ReplayResult:
    records: int
    pages: int
    skipped: int  # letters that hold no replayable record (a source item, a message)


def replay(ctx: Context, f: Filters, dry_run: bool = False) -> ReplayResult:
    """Re-enqueue the selected dead letters as pages; mark them replayed."""
    store = ctx.state
    check_ids(store, f.ids)
    limit = f" LIMIT {int(f.limit)}" if f.limit else ""
    lock = " FOR UPDATE SKIP LOCKED" if store.dialect == "postgresql" else ""
    statement, params = _query(
        store,
        "SELECT id, stream, sink, source, record_order FROM failed_ingestions"
        "{where} ORDER BY id" + limit + lock,
        f,
    )
    page_size = ctx.settings.pipeline.page_size
    with store.write() as conn:
        letters = conn.execute(statement, params).all()
        records = fetch_records(conn, [r.id for r in letters])
        groups: dict[tuple[str, str, str], list[tuple[int, list[Any], int | None]]] = defaultdict(
            list
        )
        skipped = 0
        for r in letters:
            row = _replayable(ctx, r.stream, r.sink, records.get(r.id))
            if row is None:
                skipped += 1
                continue
            groups[(r.stream, r.sink, r.source)].append((r.id, row, r.record_order))
        pages = replayed = 0
        run = f"replay-{uuid.uuid4().hex[:12]}"
        for (stream_name, sink, source), items in groups.items():
            columns = list(ctx.settings.stream(stream_name).column_names)
            for i in range(0, len(items), page_size):
                chunk = items[i : i + page_size]
                page = Page(
                    uuid.uuid4().hex,
                    stream_name,
                    sink,
                    source,
                    run,
                    columns,
                    [row for _, row, _ in chunk],
                    orders=[order for _, _, order in chunk],
                )
                if not dry_run:
                    _mark_replayed(conn, [i for i, _, _ in chunk])
                    send_page(page)
                pages += 1
                replayed += len(chunk)
        if dry_run:
            conn.rollback()
    return ReplayResult(replayed, pages, skipped)


def _replayable(ctx: Context, stream: str, sink: str, record: Any) -> list[Any] | None:
    """The record's values in the stream's column order, exactly as stored; None when the
    letter holds no record a sink can take."""
    if sink == SOURCE_SINK or stream not in ctx.settings.streams:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("columns"), list):
        return None
    columns, row = record["columns"], record.get("row")
    if not isinstance(row, list) or len(row) != len(columns):
        return None
    values = dict(zip(columns, row, strict=True))
    return [values.get(c) for c in ctx.settings.stream(stream).column_names]


def _mark_replayed(conn: Connection, ids: list[int]) -> None:
    conn.execute(
        text(
            "UPDATE failed_ingestions SET status = 'replayed', replay_count = replay_count + 1"
            " WHERE id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": ids},
    )


# -- output ---------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object) -> str:
    """Text safe for a terminal: control characters (ESC, newlines, NUL, …) shown escaped, so a
    key cannot move the cursor, clear the screen or break the table."""
    text_ = str(value)
    if not _CONTROL.search(text_) and text_.isprintable():
        return text_
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if _CONTROL.match(ch) or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
        else ch
        for ch in text_
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no dead letters match"
    head = (
        f"{'id':>6}  {'stream':<16}{'sink':<9}{'status':<10}{'tries':>5}  "
        f"{'last failure':<20}{'key':<26}error"
    )
    out = [head]
    for r in rows:
        when = _when(r["last_failed_at"])
        err = printable(f"{r['error_class']}: {r['error_message']}")
        out.append(
            f"{r['id']:>6}  {printable(r['stream']):<16}{printable(r['sink']):<9}"
            f"{r['status']:<10}{r['attempts']:>5}  {when:<20}"
            f"{printable(r['record_key'])[:24]:<26}{err[:80]}"
        )
    return "\n".join(out)


def _when(value: Any) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return str(value.strftime("%Y-%m-%d %H:%M:%S"))

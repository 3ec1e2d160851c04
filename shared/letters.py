"""Dead letters: records that could not be written, each kept whole with its reason.

A letter's `record` is what arrived, exactly: for a record, its columns and values as the page
carried them; for an item a source could not turn into a record, the item as read. It is stored as
msgpack bytes, which keep every byte, NUL, escape sequence, integer and float (PostgreSQL's jsonb
would refuse a NUL and JSON has no infinity). Its identity is a hash of those bytes, so two
different rows sharing a key are two letters, and a redelivered letter changes nothing but its
time. `payload` shows the record as JSON for people and filters: a value JSON cannot hold exactly
is shown as {"$repr": "<Python repr>"}; `dlq show` and replay read `record`, never `payload`.

Writing letters never drops one: a batch the store refuses is written letter by letter, and a
letter refused even then is stored with its payload replaced by the store's error (its `record`
bytes are accepted by any store). A store that cannot be reached raises, and the letters wait on
the dead-letter queue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from sluice.shared.state import StateStore

log = logging.getLogger("sluice.letters")

SOURCE_SINK = "source"  # the `sink` of a letter for an item that never became a record
MAX_ERROR = 10_000  # characters of an error message kept
MAX_KEY = 500  # characters of a record key kept (it is an index entry)


@dataclass(frozen=True)
class DeadLetter:
    stream: str
    sink: str  # the sink that refused the record, or "source"
    source: str
    page_id: str
    record_key: str  # for people and filters; the record itself is `record`
    record: bytes  # encode_record(...)
    error_class: str
    error_message: str
    record_order: int | None = None  # the record's source order, kept by a replay
    run_id: str | None = None  # the run whose page carried it (a replay's, when it failed again)

    def as_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, d: dict[str, Any]) -> DeadLetter:
        if "record" not in d:  # a letter sent before records were kept whole
            return cls(
                stream=str(d["stream"]),
                sink=str(d["sink"]),
                source=str(d["source"]),
                page_id=str(d["page_id"]),
                record_key=str(d["record_key"]),
                record=encode_record({"payload": d.get("payload")}),
                error_class=str(d["error_class"]),
                error_message=str(d["error_message"]),
            )
        return cls(**d)


def record_of_row(columns: Sequence[str], row: Any) -> bytes:
    """A record's letter content: the page's columns and the row as it arrived."""
    return encode_record({"columns": list(columns), "row": row})


def record_of_item(item: Any) -> bytes:
    """The letter content of an item a source could not turn into a record."""
    return encode_record({"item": item})


def encode_record(value: Any) -> bytes:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        # What msgpack cannot hold is tagged rather than lost: text with an unpaired surrogate
        # (a JSON "\ud800" escape) as its exact code units, integers beyond 64 bits and
        # unknown types as their repr.
        return bytes(msgpack.packb(_tag_unpackable(value), use_bin_type=True))


def _tag_unpackable(value: Any) -> Any:
    if isinstance(value, dict):
        return {_tag_unpackable(k): _tag_unpackable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag_unpackable(v) for v in value]
    if isinstance(value, str) and _has_surrogate(value):
        return {"$surrogates": value.encode("utf-8", "surrogatepass")}
    if value is None or isinstance(value, str | bytes | bool | float):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**64:
        return value
    return {"$repr": repr(value)}


def decode_record(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def record_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def displayable(value: Any) -> Any:
    """`value` as JSON that PostgreSQL's jsonb and SQLite both keep as it is; anything they
    cannot hold exactly (a NUL, bytes, an unpaired surrogate, infinity) as {"$repr": ...}."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$repr": repr(value)}
    if isinstance(value, str):
        return value if _json_safe(value) else {"$repr": repr(value)}
    if isinstance(value, list | tuple):
        return [displayable(v) for v in value]
    if isinstance(value, dict):
        return {
            (k if isinstance(k, str) and _json_safe(k) else repr(k)): displayable(v)
            for k, v in value.items()
        }
    return {"$repr": repr(value)}


def _has_surrogate(s: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in s)


def _json_safe(s: str) -> bool:
    return "\x00" not in s and not _has_surrogate(s)


def payload_of(record: Any) -> Any:
    """What `payload` shows: a record as {column: value}; anything else as it decodes."""
    if isinstance(record, dict) and isinstance(record.get("columns"), list):
        columns, row = record["columns"], record.get("row")
        if isinstance(row, list) and len(row) == len(columns):
            return displayable(dict(zip(columns, row, strict=True)))
        return displayable({"_row": row})
    if isinstance(record, dict) and "item" in record:
        return displayable({"_item": record["item"]})
    return displayable(record)


def text_field(value: str, limit: int) -> str:
    """A text column value every store takes: no NUL, no unpaired surrogate (both escaped)."""
    safe = value.replace("\x00", "\\x00")
    return safe.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def send_dead_letters(
    letters: Sequence[DeadLetter], page_id: str | None = None, member: str | None = None
) -> None:
    """Queue letters for the dead-letter task (consumers/dead_letter.py). `page_id`/`member`:
    the page held in its pending set until they are stored."""
    from sluice.shared.celery_app import app

    app.send_task(
        "sluice.dead_letter",
        args=[[d.as_message() for d in letters]],
        kwargs={"page_id": page_id, "member": member},
        argsrepr=f"(<{len(letters)} dead letters of page {page_id}>,)",
    )


# -- writing ------------------------------------------------------------------------------------

_UPSERT = """
INSERT INTO failed_ingestions
    (stream, sink, record_key, source, page_id, payload, error_class, error_message,
     record, record_hash, record_order, run_id, first_failed_at, last_failed_at)
VALUES (:stream, :sink, :record_key, :source, :page_id, {payload}, :error_class, :error_message,
        :record, :record_hash, :record_order, :run_id, :now, :now)
ON CONFLICT (stream, sink, record_hash) DO UPDATE SET
    source = excluded.source,
    page_id = excluded.page_id,
    run_id = COALESCE(excluded.run_id, failed_ingestions.run_id),
    error_class = excluded.error_class,
    error_message = excluded.error_message,
    last_failed_at = excluded.last_failed_at,
    -- A record failing again after a replay comes back as pending with its count raised;
    -- a redelivery of the same failure while pending changes nothing but the time.
    attempts = CASE WHEN failed_ingestions.status = 'pending' THEN failed_ingestions.attempts
                    ELSE failed_ingestions.attempts + 1 END,
    status = 'pending'
"""


def _params(store: StateStore, d: DeadLetter, payload: Any) -> dict[str, Any]:
    return {
        "stream": text_field(d.stream, 200),
        "sink": text_field(d.sink, 50),
        "record_key": text_field(d.record_key, MAX_KEY),
        "source": text_field(d.source, 200),
        "page_id": text_field(d.page_id, 200),
        "payload": json.dumps(payload, ensure_ascii=False, allow_nan=False),
        "error_class": text_field(d.error_class, 200),
        "error_message": text_field(d.error_message, MAX_ERROR),
        "record": d.record,
        "record_hash": record_hash(d.record),
        "record_order": d.record_order,
        "run_id": text_field(d.run_id, 200) if d.run_id else None,
        "now": store.now(),
    }


def _unreachable(exc: Exception) -> bool:
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def write_letters(store: StateStore, letters: Sequence[DeadLetter]) -> int:
    """Store the letters (one per record hash: a repeat only refreshes its time). Raises when
    the store cannot be reached or refuses even the fallback form; nothing is then stored."""
    sql = text(_UPSERT.format(payload=store.json("payload")))
    # One row per hash, sorted: concurrent writers then lock rows in the same order.
    unique = {(d.stream, d.sink, record_hash(d.record)): d for d in letters}
    ordered = [unique[k] for k in sorted(unique)]
    rows = [_params(store, d, payload_of(decode_record(d.record))) for d in ordered]
    if not rows:
        return 0
    try:
        with store.write() as conn:
            conn.execute(sql, rows)
        return len(rows)
    except DBAPIError as exc:
        if _unreachable(exc):
            raise
        log.warning("the store refused a batch of %d dead letters (%s); one by one", len(rows), exc)
    for d, row in zip(ordered, rows, strict=True):
        try:
            with store.write() as conn:
                conn.execute(sql, row)
        except DBAPIError as exc:
            if _unreachable(exc):
                raise
            _write_fallback(store, sql, d, exc)
    return len(rows)


def _write_fallback(store: StateStore, sql: Any, d: DeadLetter, exc: DBAPIError) -> None:
    """A letter the store refused: kept with its payload replaced by the refusal."""
    reason = text_field(str(exc.orig or exc).strip().splitlines()[0], 500)
    log.error("the store refused dead letter %s of %s: %s", d.record_key, d.stream, reason)
    with store.write() as conn:
        conn.execute(sql, _params(store, d, {"$unstorable": reason}))


# -- reading ------------------------------------------------------------------------------------


def fetch_records(conn: Connection, ids: Sequence[int]) -> dict[int, Any]:
    """The decoded `record` of each letter id that has one."""
    if not ids:
        return {}
    rows = conn.execute(
        text("SELECT id, record FROM failed_ingestions WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        ),
        {"ids": list(ids)},
    ).all()
    return {int(r[0]): decode_record(bytes(r[1])) for r in rows if r[1] is not None}

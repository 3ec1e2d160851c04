"""Dead letters in `failed_ingestions`: find, count, group, replay, discard, re-fetch, edit.

The operator's console and `sluice dlq` both work through these functions. Pages of letters are
newest first, keyset on the id (`after_id`: the last id of the previous page), so a page costs the
same at the millionth letter as at the first.

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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from sluice.shared.celery_app import send_page
from sluice.shared.context import Context
from sluice.shared.errors import SluiceError, SourceError
from sluice.shared.letters import SOURCE_SINK, decode_record, encode_record, fetch_records
from sluice.shared.page import Page
from sluice.shared.state import StateStore, read_time

STATUSES = ("pending", "replayed", "discarded")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")


class UnknownLettersError(SluiceError):
    """Dead letter ids that do not exist were named."""


class NoFilterError(SluiceError):
    """A bulk change was asked for with nothing to select the letters."""


@dataclass
class Filters:
    ids: list[int] | None = None
    stream: str | None = None
    sink: str | None = None
    error: str | None = None  # substring of the error class or message
    source: str | None = None
    since: str | datetime | None = None  # last failed at or after: ISO-8601, or 30m, 2h, 7d ago
    status: str | None = "pending"
    limit: int | None = None
    error_class: str | None = None  # exactly this class
    text: str | None = None  # substring of the key, the error class or the message
    until: str | datetime | None = None  # last failed before then
    after_id: int | None = None  # keyset: only ids below it (the previous page's last)

    def selects(self) -> bool:
        """Whether anything narrows the selection beyond its status."""
        return any(
            v not in (None, "", [])
            for v in (
                self.ids,
                self.stream,
                self.sink,
                self.error,
                self.source,
                self.since,
                self.error_class,
                self.text,
                self.until,
            )
        )


def since_time(value: str | datetime, option: str = "--since") -> datetime:
    """The time a `--since` value names: an ISO-8601 time (UTC if naive), or 30m/2h/7d ago."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    m = _RELATIVE.match(value)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise SluiceError(f"{option}: expected an ISO time or 30m/2h/7d, got {value!r}") from None
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
    if f.error_class:
        clauses.append("error_class = :error_class")
        params["error_class"] = f.error_class
    if f.text:
        op = "ILIKE" if store.dialect == "postgresql" else "LIKE"
        found = [
            f"{c} {op} :text ESCAPE '\\'" for c in ("record_key", "error_class", "error_message")
        ]
        clauses.append("(" + " OR ".join(found) + ")")
        params["text"] = f"%{_like_literal(f.text)}%"
    if f.since:
        clauses.append("last_failed_at >= :since")
        params["since"] = store.ts(since_time(f.since))
    if f.until:
        clauses.append("last_failed_at < :until")
        params["until"] = store.ts(since_time(f.until, "--until"))
    if f.after_id is not None:
        clauses.append("id < :after_id")
        params["after_id"] = int(f.after_id)
    if f.status:
        if f.status not in STATUSES:
            raise SluiceError(f"--status: expected one of {', '.join(STATUSES)}, got {f.status!r}")
        clauses.append("status = :status")
        params["status"] = f.status
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params, binds


def _like_literal(value: str) -> str:
    """`value` matched as itself by LIKE: its %, _ and backslashes escaped."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
    """Every column of one letter; `record` decoded: the record exactly as it arrived (and
    `fixed_record`, what a re-fetch or an edit queued in its place)."""
    with store.read() as conn:
        row = conn.execute(
            text("SELECT * FROM failed_ingestions WHERE id = :id"), {"id": letter_id}
        ).one_or_none()
    if row is None:
        raise UnknownLettersError(f"no dead letter with id {letter_id} (see `sluice dlq list`)")
    out = dict(row._mapping)
    for column in ("record", "fixed_record"):
        if out.get(column) is not None:
            out[column] = decode_record(bytes(out[column]))
    return out


_COLUMNS = (
    "id, stream, sink, record_key, source, error_class, error_message, attempts, status,"
    " replay_count, first_failed_at, last_failed_at"
)


@dataclass
class LetterPage:
    rows: list[dict[str, Any]]
    next_after_id: int | None  # pass as Filters.after_id for the next page; None: the last page


def page_letters(store: StateStore, f: Filters, limit: int = 50) -> LetterPage:
    """One page of the selected letters, newest first; `f.after_id` continues a listing."""
    if limit < 1:
        raise SluiceError(f"a page holds at least one letter, not {limit}")
    statement, params = _query(
        store,
        f"SELECT {_COLUMNS} FROM failed_ingestions{{where}}"
        f" ORDER BY id DESC LIMIT {int(limit) + 1}",
        replace(f, limit=None),
    )
    with store.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(statement, params)]
    more = len(rows) > limit
    rows = rows[:limit]
    return LetterPage(rows, int(rows[-1]["id"]) if more else None)


def count_letters(store: StateStore, f: Filters) -> int:
    """How many letters the filters select, every page of them (`after_id` and `limit` aside)."""
    statement, params = _query(
        store, "SELECT count(*) FROM failed_ingestions{where}", replace(f, after_id=None)
    )
    with store.read() as conn:
        return int(conn.execute(statement, params).scalar_one())


@dataclass
class ErrorGroup:
    error_class: str
    count: int
    first_at: datetime | None  # the earliest first failure of the group
    last_at: datetime | None  # the latest failure of the group


def error_groups(store: StateStore, f: Filters) -> list[ErrorGroup]:
    """The selected letters counted per error class, the largest group first."""
    statement, params = _query(
        store,
        "SELECT error_class, count(*) AS n, min(first_failed_at) AS first_at,"
        " max(last_failed_at) AS last_at FROM failed_ingestions{where}"
        " GROUP BY error_class ORDER BY n DESC, error_class",
        replace(f, after_id=None, limit=None),
    )
    with store.read() as conn:
        return [
            ErrorGroup(str(r.error_class), int(r.n), read_time(r.first_at), read_time(r.last_at))
            for r in conn.execute(statement, params)
        ]


def discard(store: StateStore, f: Filters, dry_run: bool = False, everything: bool = False) -> int:
    """Mark the selected letters discarded; the count (that would be) discarded. A selection
    with nothing but a status is refused unless `everything`: discarding every pending letter
    must be asked for."""
    if not f.selects() and not everything:
        raise NoFilterError(
            "discard needs a selection: ids, or a filter (--stream, --error-class, --text, …);"
            " --all discards every letter of the status"
        )
    check_ids(store, f.ids)
    if dry_run:
        n = count_letters(store, f)
        return min(n, f.limit) if f.limit else n
    if f.limit:
        inner, params = _query(
            store, f"SELECT id FROM failed_ingestions{{where}} ORDER BY id LIMIT {int(f.limit)}", f
        )
        statement: Any = text(
            f"UPDATE failed_ingestions SET status = 'discarded' WHERE id IN ({inner.text})"
        )
        if f.ids:
            statement = statement.bindparams(bindparam("ids", expanding=True))
    else:
        statement, params = _query(
            store, "UPDATE failed_ingestions SET status = 'discarded'{where}", f
        )
    with store.write() as conn:
        return int(conn.execute(statement, params).rowcount)


@dataclass
class ReplayResult:
    records: int
    pages: int
    skipped: int  # letters that hold no replayable record (a source item, a message)


@dataclass
class _Fix:
    """A record to queue for a letter: its values in the stream's column order."""

    letter: int
    stream: str
    sink: str  # the letter's sink; "source": every sink of the stream
    source: str
    rows: list[list[Any]]
    order: int | None
    fixed: bytes | None = None  # the record as queued, when it is not the letter's own
    how: str | None = None  # "refetch" | "edit"


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
    with store.write() as conn:
        letters = conn.execute(statement, params).all()
        records = fetch_records(conn, [r.id for r in letters])
        fixes: list[_Fix] = []
        skipped = 0
        for r in letters:
            row = _replayable(ctx, r.stream, r.sink, records.get(r.id))
            if row is None:
                skipped += 1
                continue
            fixes.append(_Fix(r.id, r.stream, r.sink, r.source, [row], r.record_order))
        records_, pages = _queue(ctx, conn, fixes, "replay", dry_run)
        if dry_run:
            conn.rollback()
    return ReplayResult(records_, pages, skipped)


def _queue(
    ctx: Context, conn: Connection, fixes: list[_Fix], kind: str, dry_run: bool = False
) -> tuple[int, int]:
    """Send the records as pages (the letter's sink, or every sink of the stream for a letter
    of the source) and mark their letters replayed, in `conn`'s transaction; (records, pages)."""
    page_size = ctx.settings.pipeline.page_size
    groups: dict[tuple[str, str, str], list[tuple[_Fix, list[Any]]]] = defaultdict(list)
    for fix in fixes:
        for row in fix.rows:
            groups[(fix.stream, fix.sink, fix.source)].append((fix, row))
    pages = records = 0
    run = f"{kind}-{uuid.uuid4().hex[:12]}"
    for (stream_name, sink, source), items in groups.items():
        stream = ctx.settings.stream(stream_name)
        sinks = list(stream.sinks) if sink == SOURCE_SINK else [sink]
        for i in range(0, len(items), page_size):
            chunk = items[i : i + page_size]
            page = Page(
                uuid.uuid4().hex,
                stream_name,
                sinks[0],
                source,
                run,
                list(stream.column_names),
                [row for _, row in chunk],
                orders=[fix.order for fix, _ in chunk],
            )
            if not dry_run:
                _mark_replayed(conn, ctx.state, [fix for fix, _ in chunk])
                for target in sinks:
                    send_page(page.for_sink(target))
            pages += len(sinks)
            records += len(chunk)
    return records, pages


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


def _mark_replayed(conn: Connection, store: StateStore, fixes: list[_Fix]) -> None:
    plain = sorted({f.letter for f in fixes if f.fixed is None})
    if plain:
        conn.execute(
            text(
                "UPDATE failed_ingestions SET status = 'replayed',"
                " replay_count = replay_count + 1 WHERE id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": plain},
        )
    fixed = {f.letter: f for f in fixes if f.fixed is not None}
    if fixed:
        conn.execute(
            text(
                "UPDATE failed_ingestions SET status = 'replayed',"
                " replay_count = replay_count + 1, fixed_record = :fixed, fixed_how = :how,"
                " fixed_at = :now WHERE id = :id"
            ),
            [
                {"id": i, "fixed": f.fixed, "how": f.how, "now": store.now()}
                for i, f in sorted(fixed.items())
            ],
        )


# -- repairs: what a replay of the stored record cannot fix -------------------------------------


class RefetchError(SluiceError):
    """The letters cannot be re-read from their source."""


class InvalidEditError(SluiceError):
    """An edited record that its stream would refuse."""


@dataclass
class RefetchResult:
    refetched: list[int] = field(default_factory=list)  # letters whose fresh record was queued
    records: int = 0
    pages: int = 0
    # Letters whose key the source no longer holds: {"id", "source", "key"}; left pending.
    missing: list[dict[str, Any]] = field(default_factory=list)
    # Letters whose fresh record is still invalid: {"id", "key", "error"}; left pending.
    invalid: list[dict[str, Any]] = field(default_factory=list)


def refetch(ctx: Context, ids: list[int]) -> RefetchResult:
    """Read each letter's record again from its source, by key (a D1 table's row with that
    key; a KV key, or the KV record with that key), and queue the fresh record as a replay
    does, when its stream accepts it. The letter keeps the record as it failed and gains the
    record as queued (`fixed_record`). HTTP API sources cannot be read by key: refused."""
    from sluice.producers.registry import open_source
    from sluice.shared.settings import D1SourceConfig, KvSourceConfig

    store = ctx.state
    if not ids:
        raise RefetchError("refetch needs the ids of the letters to read again")
    check_ids(store, ids)
    with store.read() as conn:
        letters = conn.execute(
            text(
                "SELECT id, stream, sink, source, record_key, record_order, record"
                " FROM failed_ingestions WHERE id IN :ids ORDER BY id"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": list(ids)},
        ).all()
    by_source: dict[str, list[Any]] = defaultdict(list)
    for r in letters:
        by_source[r.source].append(r)
    for name in by_source:
        cfg = ctx.settings.sources.get(name)
        if cfg is None:
            raise RefetchError(
                f"dead letters of source {name!r}, which is not configured: nothing to read"
                " them from",
                source=name,
            )
        if not isinstance(cfg, D1SourceConfig | KvSourceConfig):
            raise RefetchError(
                f"source {name!r} is an HTTP API ({cfg.kind}): it cannot be read by key;"
                f" fetch its time range again with `sluice backfill {name}`",
                source=name,
            )
    result = RefetchResult()
    fixes: list[_Fix] = []
    for name, rows in by_source.items():
        src: Any = open_source(ctx.settings, name)
        try:
            for r in rows:
                key = _source_key(r)
                try:
                    if isinstance(ctx.settings.sources[name], D1SourceConfig):
                        one = src.read_key(key)
                        fresh = None if one is None else [one]
                    else:
                        fresh = src.read_key(r.stream, key)
                except SourceError as exc:
                    result.invalid.append({"id": r.id, "key": key, "error": exc.message})
                    continue
                if fresh is None:
                    result.missing.append({"id": r.id, "source": name, "key": key})
                    continue
                problem = _invalid(ctx, r.stream, fresh)
                if problem is not None:
                    result.invalid.append({"id": r.id, "key": key, "error": problem})
                    continue
                columns = list(ctx.settings.stream(r.stream).column_names)
                fixes.append(
                    _Fix(
                        r.id,
                        r.stream,
                        r.sink,
                        r.source,
                        fresh,
                        r.record_order,
                        _fixed_record(columns, fresh),
                        "refetch",
                    )
                )
        finally:
            src.close()
    with store.write() as conn:
        result.records, result.pages = _queue(ctx, conn, fixes, "refetch")
    result.refetched = [f.letter for f in fixes]
    return result


def _fixed_record(columns: list[str], rows: list[list[Any]]) -> bytes:
    """What a repaired letter keeps of the record(s) queued in its place."""
    if len(rows) == 1:
        return encode_record({"columns": columns, "row": rows[0]})
    return encode_record({"columns": columns, "rows": rows})


def _source_key(letter: Any) -> str:
    """The key to read the letter's record by: a KV item's own key when the letter holds one
    (a value that could not be mapped), else the record's key."""
    if letter.sink == SOURCE_SINK and letter.record is not None:
        record = decode_record(bytes(letter.record))
        item = record.get("item") if isinstance(record, dict) else None
        if isinstance(item, dict) and isinstance(item.get("kv_key"), str):
            return str(item["kv_key"])
    return str(letter.record_key)


def _invalid(ctx: Context, stream_name: str, rows: list[list[Any]]) -> str | None:
    """Why the stream would refuse one of the rows; None when it takes them all."""
    stream = ctx.settings.stream(stream_name)
    _, bad = ctx.validator(stream).validate(stream.column_names, rows)
    if not bad:
        return None
    b = bad[0]
    return f"{b.error_class}: {b.field}: {b.rule}" if b.field else f"{b.error_class}: {b.rule}"


@dataclass
class EditResult:
    letter: int
    record: dict[str, Any]  # the record as queued
    pages: int


def edit(ctx: Context, letter_id: int, record: dict[str, Any]) -> EditResult:
    """Queue an edited record in place of letter `letter_id`'s, once its stream accepts it:
    an invalid edit raises InvalidEditError and changes nothing. The letter keeps the record
    as it failed and gains the record as queued (`fixed_record`, `fixed_how` "edit")."""
    letter = show_letter(ctx.state, letter_id)
    if letter["stream"] not in ctx.settings.streams:
        raise InvalidEditError(
            f"letter {letter_id} is of stream {letter['stream']!r}, which is not configured",
            stream=letter["stream"],
        )
    stream = ctx.settings.stream(letter["stream"])
    unknown = sorted(set(record) - set(stream.column_names))
    if unknown:
        raise InvalidEditError(
            f"{stream.name} has no column {', '.join(map(repr, unknown))}"
            f" (columns: {', '.join(stream.column_names)})",
            stream=stream.name,
        )
    row = [record.get(c) for c in stream.column_names]
    problem = _invalid(ctx, stream.name, [row])
    if problem is not None:
        raise InvalidEditError(
            f"the edited record is invalid: {problem}; nothing was queued", stream=stream.name
        )
    fix = _Fix(
        letter_id,
        stream.name,
        letter["sink"],
        letter["source"],
        [row],
        letter.get("record_order"),
        encode_record({"columns": list(stream.column_names), "row": row}),
        "edit",
    )
    with ctx.state.write() as conn:
        _, pages = _queue(ctx, conn, [fix], "edit")
    return EditResult(letter_id, dict(zip(stream.column_names, row, strict=True)), pages)


def record_values(letter: dict[str, Any]) -> dict[str, Any]:
    """A letter's record as {column: value}, as `show_letter` decoded it (the start of an
    edit); empty when the letter holds no record of columns."""
    record = letter.get("record")
    if isinstance(record, dict) and isinstance(record.get("columns"), list):
        row = record.get("row")
        if isinstance(row, list) and len(row) == len(record["columns"]):
            return dict(zip(record["columns"], row, strict=True))
    return {}


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

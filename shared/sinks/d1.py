"""Remote D1 sink: each page is ONE D1 batch over the REST API, so it commits or rolls back whole.

D1 refuses BEGIN/COMMIT; the statements of one `{"batch": [...]}` request run as one transaction
(https://developers.cloudflare.com/d1/worker-api/d1-database/#batch). The
client is shared/cloudflare.py (retries, Retry-After, envelope errors), shared with the D1 source.
A page's batch, in order:

1. `INSERT INTO ingestion_runs …` with no ON CONFLICT: a page already committed (a redelivery, or
   a retry after a timeout that D1 had in fact committed) fails here on the primary key, the batch
   rolls back, and a lookup confirms it: nothing is written twice, even under the `update` policy.
2. Count the page's keys already in the table, into `ingestion_runs.duplicates`; under
   `update`/`newer`, also its rows equal to what the table holds, into `unchanged`.
3. Multi-row `INSERT … VALUES (…),(…) ON CONFLICT …` (the SQLite sink's SQL), chunked so every
   statement keeps to 100 bound parameters and 100,000 bytes.
   After each, `changes()` (rows it wrote, new or replacing) is added to `ingestion_runs.updated`.
4. Count the page's keys present now, into `ingestion_runs.inserted`; the difference is exact.
5. Finish the counts (inserted, updated, unchanged, duplicates), then read them back.

Why count keys rather than read `meta.changes`: D1's `changes` counts rows updated by
`ON CONFLICT DO UPDATE` as well as rows inserted, so under `update`/`newer` it cannot tell a new
record from an existing one. Counting keys before and after inside the same transaction is exact
for every policy (and, under `ignore`, leaves out a row skipped for a conflict on another unique
index, which `changes` would also leave out).

Statement size: D1's limit is on the SQL text (100,000 bytes), but a row is also bounded (2 MB;
https://developers.cloudflare.com/d1/platform/limits/), so we count text plus the JSON size of
the bound values: a record that cannot fit a statement on its own is a permanent per-record error
naming its key, and bisect isolation dead-letters it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sluice.shared.cloudflare import (
    MAX_BOUND_PARAMS,
    MAX_STATEMENT_BYTES,
    D1Client,
    Param,
    encode_param,
)
from sluice.shared.database import quote
from sluice.shared.errors import (
    D1Error,
    ForeignKeyViolationError,
    RejectedBySinkError,
    SinkError,
    TransientSinkError,
)
from sluice.shared.records import record_key
from sluice.shared.settings import D1SinkConfig
from sluice.shared.sinks import (
    ORDER_COLUMN,
    PageMeta,
    WriteResult,
    equal_rows_sql,
    with_orders,
)
from sluice.shared.sinks.sqlite import (
    COMMITTED_AT,
    RUN_INSERT,
    delete_sql,
    insert_sql,
    run_params,
    values_group,
)
from sluice.shared.streams import Stream

log = logging.getLogger("sluice.d1_sink")

SINK = "d1"
# SQLite result codes (as D1 appends them to its messages) that mean "this data was refused":
# the page is bisected to find the records. Other SQL errors (no such table, not authorized) are
# about the database, not the records, and fail the page whole.
DATA_ERRORS = (
    "SQLITE_CONSTRAINT",
    "SQLITE_MISMATCH",
    "SQLITE_TOOBIG",
    "SQLITE_RANGE",
    "D1_TYPE_ERROR",
)

Statement = tuple[str, list[Param]]


@dataclass(frozen=True)
class _Item:
    """One unit of a chunked statement: its values and what they add to the statement."""

    params: list[Param]
    sql_bytes: int  # placeholder text, separator included
    value_bytes: int  # JSON size of the values


def _json_size(value: Param) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def chunk(
    items: Sequence[_Item], *, fixed_params: int, fixed_bytes: int
) -> tuple[list[list[_Item]], int | None]:
    """Greedy split into statements within MAX_BOUND_PARAMS and MAX_STATEMENT_BYTES.

    Returns the chunks, and the index of the first item that cannot fit a statement even alone
    (None if all fit)."""
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    params = fixed_params
    size = fixed_bytes
    for index, item in enumerate(items):
        cost = item.sql_bytes + item.value_bytes
        n = len(item.params)
        if fixed_params + n > MAX_BOUND_PARAMS or fixed_bytes + cost > MAX_STATEMENT_BYTES:
            return chunks, index
        if current and (params + n > MAX_BOUND_PARAMS or size + cost > MAX_STATEMENT_BYTES):
            chunks.append(current)
            current, params, size = [], fixed_params, fixed_bytes
        current.append(item)
        params += n
        size += cost
    if current:
        chunks.append(current)
    return chunks, None


def statement_bytes(sql: str, params: Sequence[Param]) -> int:
    """The size we keep under MAX_STATEMENT_BYTES: SQL text plus the JSON of its values."""
    return len(sql.encode("utf-8")) + sum(_json_size(p) for p in params)


def d1_client(
    cfg: D1SinkConfig, token: str, sleep: Callable[[float], None] | None = None
) -> D1Client:
    """The REST client for the D1 sink's database (also used by `sluice reconcile`)."""
    extra: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
    return D1Client(
        account_id=cfg.account_id,
        database_id=cfg.database_id,
        api_token=token,
        base_url=cfg.base_url,
        timeout=(cfg.connect_timeout, cfg.read_timeout),
        max_attempts=cfg.max_attempts,
        **extra,
    )


class D1Sink:
    """Writes pages to a remote D1 database. One client (one HTTP session) per process."""

    name = SINK

    def __init__(
        self,
        config: D1SinkConfig,
        token: Callable[[], str | None],
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config
        self._token = token  # read when first needed, so a missing one fails the page clearly
        self._sleep = sleep
        self._client: D1Client | None = None

    def __repr__(self) -> str:
        cfg = self.config
        return f"D1Sink(account_id={cfg.account_id!r}, database_id={cfg.database_id!r})"

    def client(self) -> D1Client:
        if self._client is None:
            cfg = self.config
            token = self._token()
            if not token:
                raise SinkError(
                    f"the remote D1 sink needs an API token in ${cfg.api_token_env}",
                    sink=SINK,
                    database=cfg.database_id,
                )
            self._client = d1_client(cfg, token, self._sleep)
        return self._client

    # -- the batch ------------------------------------------------------------------------------

    def page_batch(
        self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta
    ) -> list[Statement]:
        """The statements of one page's batch (see the module docstring). Raises
        RejectedBySinkError naming the key of a record that cannot be sent."""
        rows = with_orders(stream, rows)
        run_key: list[Param] = [meta.page_id, SINK]
        run_values: list[Param] = [
            encode_param(v, i) for i, v in enumerate(run_params(SINK, stream, meta))
        ]
        records = [self._encode_row(stream, row) for row in rows]

        # Inserts: a multi-row VALUES statement per chunk.
        group = values_group(stream)
        head = insert_sql(stream, 1)
        fixed = len(head.encode("utf-8")) - len(group)
        items = [
            _Item(params, len(group) + 2, sum(_json_size(p) for p in params)) for params in records
        ]
        inserts, too_big = chunk(items, fixed_params=0, fixed_bytes=fixed)
        if too_big is not None:
            key = record_key(stream, rows[too_big])
            size = fixed + items[too_big].sql_bytes + items[too_big].value_bytes
            raise RejectedBySinkError(
                f"record {key} needs a {size}-byte INSERT statement, over D1's limit of"
                f" {MAX_STATEMENT_BYTES} bytes per statement",
                sink=SINK,
                stream=stream.name,
                key=key,
            )

        statements: list[Statement] = [(RUN_INSERT, run_values)]
        counts_before = self._key_counts(stream, records, "duplicates", run_key)
        statements += counts_before
        if stream.conflict != "ignore":
            statements += self._equal_counts(stream, records, run_key)
        for part in inserts:
            sql = insert_sql(stream, len(part))
            statements.append((sql, [p for item in part for p in item.params]))
            # changes(): rows the INSERT just wrote, new or replacing; summed in `updated`.
            statements.append(
                (
                    "UPDATE ingestion_runs SET updated = updated + changes()"
                    " WHERE page_id = ? AND sink = ?",
                    list(run_key),
                )
            )
        statements += self._key_counts(stream, records, "inserted", run_key)
        valid = meta.received - meta.invalid
        # Right-hand sides see the old values: keys after - keys before = inserted; rows written
        # - inserted - equal rows still written (scratch in `deleted`) = updated; equal rows =
        # unchanged; the rest of the valid records are duplicates (sinks.page_counts).
        statements.append(
            (
                "UPDATE ingestion_runs SET inserted = inserted - duplicates,"
                " updated = updated - (inserted - duplicates) - deleted,"
                " duplicates = ? - updated + deleted - unchanged, deleted = 0,"
                f" committed_at = {COMMITTED_AT} WHERE page_id = ? AND sink = ?",
                [valid, *run_key],
            )
        )
        statements.append(
            (
                "SELECT inserted, duplicates, updated, unchanged FROM ingestion_runs"
                " WHERE page_id = ? AND sink = ?",
                list(run_key),
            )
        )
        return statements

    @staticmethod
    def _encode_row(stream: Stream, row: Sequence[Any]) -> list[Param]:
        out: list[Param] = []
        names = (*stream.column_names, ORDER_COLUMN)
        for i, value in enumerate(row):
            try:
                out.append(encode_param(value, i))
            except D1Error as exc:
                key = record_key(stream, row)
                raise RejectedBySinkError(
                    f"{names[i]}: {exc.message}",
                    sink=SINK,
                    stream=stream.name,
                    key=key,
                ) from None
        return out

    @staticmethod
    def _key_counts(
        stream: Stream, records: list[list[Param]], column: str, run_key: list[Param]
    ) -> list[Statement]:
        """Statements adding to ingestion_runs.<column> how many of the page's keys the table
        holds (chunked like the inserts; the keys were bounded by the insert chunking)."""
        table = quote(stream.table)
        if len(stream.key) == 1:
            target = quote(stream.key[0])
            mark = "?"
        else:
            target = "(" + ", ".join(quote(k) for k in stream.key) + ")"
            mark = "(" + ", ".join("?" for _ in stream.key) + ")"
        keys = [[r[i] for i in stream.key_indexes] for r in records]
        items = [_Item(k, len(mark) + 2, sum(_json_size(v) for v in k)) for k in keys]

        def sql(marks: str) -> str:
            where = (
                f"{target} IN ({marks})"
                if len(stream.key) == 1
                else f"{target} IN (VALUES {marks})"
            )
            return (
                f"UPDATE ingestion_runs SET {column} = {column} + (SELECT count(*) FROM {table}"
                f" WHERE {where}) WHERE page_id = ? AND sink = ?"
            )

        return _per_chunk(stream, sql, mark, items, records, run_key)

    @staticmethod
    def _equal_counts(
        stream: Stream, records: list[list[Param]], run_key: list[Param]
    ) -> list[Statement]:
        """Statements adding to ingestion_runs.unchanged the page's rows equal to what the
        table holds, and to `deleted` (a scratch count, reset by the batch's last UPDATE) how
        many of those the update policy still writes; chunked like the inserts."""
        names = [*stream.column_names, ORDER_COLUMN]
        match = " AND ".join(f"t.{quote(k)} = v.{quote(k)}" for k in stream.key)
        count = equal_rows_sql(stream, "t", "v", "sqlite").format(
            source=f"FROM v JOIN {quote(stream.table)} t ON {match}"
        )
        group = values_group(stream)

        def sql(groups: str) -> str:
            return (
                "UPDATE ingestion_runs SET (unchanged, deleted) = (SELECT"
                " ingestion_runs.unchanged + q.n, ingestion_runs.deleted + q.w FROM (WITH"
                f" v({', '.join(quote(n) for n in names)}) AS (VALUES {groups}) {count}) q)"
                " WHERE page_id = ? AND sink = ?"
            )

        items = [_Item(r, len(group) + 2, sum(_json_size(p) for p in r)) for r in records]
        return _per_chunk(stream, sql, group, items, records, run_key)

    # -- writing --------------------------------------------------------------------------------

    def _run(
        self, stream: Stream, statements: list[Statement], meta: PageMeta
    ) -> dict[str, Any] | None:
        """Send a page's batch; the row its last statement reads back (the page's counts), or
        None when the page had been committed before (its ingestion_runs row is there)."""
        try:
            results = self.client().batch(statements)
        except D1Error as exc:
            if exc.transient:
                raise TransientSinkError(
                    exc.message, sink=SINK, stream=stream.name, status=exc.status, code=exc.code
                ) from exc
            if "ingestion_runs" in exc.message and self._committed(stream, meta):
                return None
            raise classify(exc, stream.name) from exc
        counts = results[-1].get("results") if results else None
        if not (isinstance(counts, list) and len(counts) == 1 and isinstance(counts[0], dict)):
            raise SinkError(
                f"D1 answered the page's batch without its ingestion_runs row: {counts!r}"[:300],
                sink=SINK,
                stream=stream.name,
                page=meta.page_id,
            )
        return dict(counts[0])

    def write(self, stream: Stream, rows: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        c = self._run(stream, self.page_batch(stream, rows, meta), meta)
        if c is None:
            return WriteResult(0, 0, already_committed=True)
        return WriteResult(
            int(c["inserted"]),
            int(c["duplicates"]),
            updated=int(c["updated"]),
            unchanged=int(c["unchanged"]),
        )

    def delete(self, stream: Stream, keys: Sequence[Sequence[Any]], meta: PageMeta) -> WriteResult:
        """One batch: the ingestion_runs row, a DELETE per key, the count of rows removed."""
        run_key: list[Param] = [meta.page_id, SINK]
        run_values: list[Param] = [
            encode_param(v, i) for i, v in enumerate(run_params(SINK, stream, meta))
        ]
        statements: list[Statement] = [(RUN_INSERT, run_values)]
        for k in keys:
            *key, order = (encode_param(v, i) for i, v in enumerate(k))
            statements.append((delete_sql(stream), [*key, order, order]))
            statements.append(
                (
                    "UPDATE ingestion_runs SET deleted = deleted + changes()"
                    " WHERE page_id = ? AND sink = ?",
                    list(run_key),
                )
            )
        statements.append(
            (
                "UPDATE ingestion_runs SET duplicates = ? - deleted,"
                f" committed_at = {COMMITTED_AT} WHERE page_id = ? AND sink = ?",
                [len(keys), *run_key],
            )
        )
        statements.append(
            (
                "SELECT deleted FROM ingestion_runs WHERE page_id = ? AND sink = ?",
                list(run_key),
            )
        )
        c = self._run(stream, statements, meta)
        if c is None:
            return WriteResult(0, 0, already_committed=True)
        deleted = int(c["deleted"])
        return WriteResult(0, len(keys) - deleted, deleted=deleted)

    def _committed(self, stream: Stream, meta: PageMeta) -> bool:
        """Whether the page's ingestion_runs row exists (a batch fails on it for a page that is
        already in; the lookup tells that apart from a record's own constraint violation)."""
        try:
            rows = self.client().query(
                "SELECT 1 AS found FROM ingestion_runs WHERE page_id = ? AND sink = ?",
                [meta.page_id, SINK],
            )
        except D1Error as exc:
            raise classify(exc, stream.name) from exc
        return bool(rows)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None


def _per_chunk(
    stream: Stream,
    sql: Callable[[str], str],
    mark: str,
    items: list[_Item],
    records: list[list[Param]],
    run_key: list[Param],
) -> list[Statement]:
    """`sql(<marks>)` once per chunk of `items` that fits D1's statement limits, the run's key
    last among the parameters."""
    fixed = len(sql("").encode("utf-8")) + sum(_json_size(v) for v in run_key)
    parts, too_big = chunk(items, fixed_params=len(run_key), fixed_bytes=fixed)
    if too_big is not None:  # cannot happen for a row that fitted its INSERT; kept exact
        raise RejectedBySinkError(
            "record too large for a D1 statement",
            sink=SINK,
            stream=stream.name,
            key=record_key(stream, records[too_big]),
        )
    return [
        (
            sql(", ".join([mark] * len(part))),
            [*(v for item in part for v in item.params), *run_key],
        )
        for part in parts
    ]


def classify(exc: D1Error, stream: str | None) -> SinkError:
    """Our error for a D1 failure: retry it, isolate the records it refused, or fail the page."""
    context: dict[str, object] = {
        "sink": SINK,
        "stream": stream,
        "status": exc.status,
        "code": exc.code,
    }
    if exc.transient:
        return TransientSinkError(exc.message, **context)
    # As in the other sinks: the consumer retries a child page whose parent is still on its way
    # (a KV migration's users page) instead of dead-lettering it at once.
    if "FOREIGN KEY constraint failed" in exc.message:
        return ForeignKeyViolationError(exc.message, **context)
    # A failure reported inside HTTP 200 (`success:false`, a statement's success=false) is about
    # this batch's statements; so are the data error codes.
    if exc.status == 200 or any(code in exc.message for code in DATA_ERRORS):
        return RejectedBySinkError(exc.message, **context)
    return SinkError(exc.message, **context)

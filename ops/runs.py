"""Run history: source runs (`source_runs`) newest first, the latest per source, and one run
with the pages it wrote (`ingestion_runs`, one row per page and sink) and their dead letters.

Pages are keyset on (started_at, run_id): `next_before` of a page is where the next one starts,
so reading the ten-thousandth page costs what the first does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text

from sluice.shared.errors import SluiceError
from sluice.shared.state import StateStore, read_time

# A produce run: queued, running, then ok, partial, failed, skipped or died; a backfill ends
# complete, stopped, partial, failed or skipped.
RUN_STATUSES = (
    "queued",
    "running",
    "ok",
    "partial",
    "failed",
    "skipped",
    "died",
    "complete",
    "stopped",
)
RUN_KINDS = ("produce", "backfill")
_COLUMNS = (
    "run_id, source, stream, kind, status, started_at, finished_at, pages, records, error, detail"
)


class UnknownRunError(SluiceError):
    """A run id that no run has."""


@dataclass
class RunFilters:
    source: str | None = None
    status: str | None = None
    kind: str | None = None  # "produce" (scheduled or manual runs) or "backfill"
    # Keyset: only runs before this (started_at, run_id), as a page's `next_before` gives it.
    before: tuple[datetime, str] | None = None
    limit: int = 50


@dataclass
class RunPage:
    rows: list[dict[str, Any]]
    next_before: tuple[datetime, str] | None  # RunFilters.before of the next page; None: last


def _row(store: StateStore, r: Any) -> dict[str, Any]:
    out = dict(r._mapping)
    out["started_at"] = read_time(out["started_at"])
    out["finished_at"] = read_time(out["finished_at"])
    started, finished = out["started_at"], out["finished_at"]
    out["seconds"] = (
        round((finished - started).total_seconds(), 3) if started and finished else None
    )
    return out


def list_runs(store: StateStore, f: RunFilters) -> RunPage:
    """One page of runs, newest first, of one source, status or kind when given."""
    if f.limit < 1:
        raise SluiceError(f"a page holds at least one run, not {f.limit}")
    if f.status is not None and f.status not in RUN_STATUSES:
        raise SluiceError(f"--status: expected one of {', '.join(RUN_STATUSES)}, got {f.status!r}")
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for column in ("source", "status", "kind"):
        value = getattr(f, column)
        if value:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if f.before is not None:
        at, run_id = f.before
        # `started_at <= :at` alone bounds the index range; the rest drops the ties before it.
        clauses.append("started_at <= :at AND (started_at < :at OR run_id < :run_id)")
        params.update(at=store.ts(at), run_id=run_id)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = (
        f"SELECT {_COLUMNS} FROM source_runs{where}"
        f" ORDER BY started_at DESC, run_id DESC LIMIT {int(f.limit) + 1}"
    )
    with store.read() as conn:
        rows = [_row(store, r) for r in conn.execute(text(sql), params)]
    more = len(rows) > f.limit
    rows = rows[: f.limit]
    last = rows[-1] if more else None
    return RunPage(rows, (last["started_at"], str(last["run_id"])) if last else None)


def latest_runs(store: StateStore) -> dict[str, dict[str, Any]]:
    """The latest run of each source that ever ran, by source name."""
    out: dict[str, dict[str, Any]] = {}
    with store.read() as conn:
        # The sources by a skip over the (source, …) index, one step per source, then the newest
        # run of each: a few index lookups, where DISTINCT or a window would read every run.
        sources = [
            r[0]
            for r in conn.execute(
                text(
                    "WITH RECURSIVE s(source) AS ("
                    " SELECT min(source) FROM source_runs"
                    " UNION ALL SELECT (SELECT min(source) FROM source_runs r"
                    " WHERE r.source > s.source) FROM s WHERE s.source IS NOT NULL)"
                    " SELECT source FROM s WHERE source IS NOT NULL"
                )
            )
        ]
        one = text(
            f"SELECT {_COLUMNS} FROM source_runs WHERE source = :s"
            " ORDER BY started_at DESC, run_id DESC LIMIT 1"
        )
        for name in sources:
            row = conn.execute(one, {"s": name}).first()
            if row is not None:
                out[str(name)] = _row(store, row)
    return out


@dataclass
class RunDetail:
    run: dict[str, Any]
    # One row per page and sink that committed it: received, inserted, duplicates, invalid…
    pages: list[dict[str, Any]] = field(default_factory=list)
    # Its dead letters, items its source could not read included: id, sink, key, error (at
    # most `letters_limit`; `letters_total` counts them all).
    letters: list[dict[str, Any]] = field(default_factory=list)
    letters_total: int = 0


def show_run(store: StateStore, run_id: str, letters_limit: int = 100) -> RunDetail:
    """The run, the pages it wrote as this store recorded them, and their dead letters."""
    with store.read() as conn:
        row = conn.execute(
            text(f"SELECT {_COLUMNS} FROM source_runs WHERE run_id = :r"), {"r": run_id}
        ).first()
        if row is None:
            raise UnknownRunError(f"no run with id {run_id!r} (see `sluice runs list`)")
        pages = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT page_id, sink, stream, received, inserted, updated, unchanged,"
                    " duplicates, invalid, deleted, attempts, started_at, committed_at"
                    " FROM ingestion_runs WHERE run_id = :r ORDER BY committed_at, page_id, sink"
                ),
                {"r": run_id},
            )
        ]
        # Its letters carry its id; letters stored before they did are found by its pages.
        page_ids = sorted({p["page_id"] for p in pages}) or [""]
        where = " WHERE run_id = :r OR (run_id IS NULL AND page_id IN :pages)"
        bind: Any = bindparam("pages", expanding=True)
        params = {"r": run_id, "pages": page_ids}
        total = int(
            conn.execute(
                text("SELECT count(*) FROM failed_ingestions" + where).bindparams(bind), params
            ).scalar_one()
        )
        letters = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT id, page_id, sink, record_key, error_class, error_message,"
                    " status FROM failed_ingestions" + where + " ORDER BY id"
                    f" LIMIT {int(letters_limit)}"
                ).bindparams(bind),
                params,
            )
        ]
    for p in pages:
        p["started_at"] = read_time(p["started_at"])
        p["committed_at"] = read_time(p["committed_at"])
    return RunDetail(_row(store, row), pages, letters, total)

"""`sluice prune`: delete what `[retention]` says has been kept long enough, target by target.

Targets, each pruned and recorded on its own (a target that fails leaves the others to run):
- `d1:SOURCE`: processed rows of a mark-capture D1 source whose key every sink holds
  (ops/prune_d1.py);
- `letters`: dead letters replayed or discarded;
- `source_runs` and `ingestion_runs:SINK`: run history, rolled up into daily totals first;
- `cache:SINK`: expired rows of the `cache` table.

Every real prune of a target is a row of `prune_runs` in the state store (what, how many rows,
how long, and why rows were kept); `sluice status` shows the latest per target. A dry run
counts what would go and records nothing.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg2
import sqlalchemy.exc
from sqlalchemy import text

from sluice.ops.prune_d1 import Tally, prune_d1_source
from sluice.ops.prune_history import last_prunes
from sluice.ops.prune_sinks import KeyCheck, SinkUnavailableError, open_key_checks
from sluice.ops.prune_tables import (
    SOURCE_RUNS,
    Rollup,
    ingestion_runs,
    prune_cache,
    prune_letters,
)
from sluice.shared.database import postgres_engine, postgres_url
from sluice.shared.errors import SluiceError
from sluice.shared.settings import D1SourceConfig, Settings
from sluice.shared.state import StateStore, open_state, sqlite_engine

__all__ = ["PruneResult", "last_prunes", "run_prune", "summary"]

log = logging.getLogger("sluice.prune")

Kind = Literal["d1", "letters", "runs", "cache"]
KINDS: tuple[Kind, ...] = ("d1", "letters", "runs", "cache")
DAY = timedelta(days=1)
# What a target's prune may raise and the others still run after.
_DATABASE_ERRORS = (SluiceError, sqlalchemy.exc.SQLAlchemyError, psycopg2.Error, sqlite3.Error)


@dataclass
class PruneResult:
    """One target's prune: rows deleted (dry: that would be), rows kept though old enough."""

    target: str
    deleted: int = 0
    kept: int = 0
    seconds: float = 0.0
    status: Literal["ok", "partial", "failed"] = "ok"
    notes: list[str] = field(default_factory=list)
    unavailable: bool = False  # a database could not be reached

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "deleted": self.deleted,
            "kept": self.kept,
            "seconds": round(self.seconds, 3),
            "status": self.status,
            "notes": list(self.notes),
        }


@dataclass
class _Stores:
    """The databases a prune touches, opened on first use and disposed at the end."""

    settings: Settings
    _open: dict[str, StateStore] = field(default_factory=dict)

    def get(self, name: str) -> StateStore:
        if name not in self._open:
            if name == "state":
                self._open[name] = open_state(self.settings)
            elif name == "postgres":
                self._open[name] = StateStore(postgres_engine(postgres_url(self.settings)))
            else:
                busy = self.settings.pipeline.sqlite_busy_timeout_ms
                self._open[name] = StateStore(sqlite_engine(self.settings.sqlite_path, busy))
        return self._open[name]

    def close(self) -> None:
        for store in self._open.values():
            store.dispose()


Job = tuple[str, Callable[[], Tally]]


def prunable_sources(settings: Settings) -> dict[str, D1SourceConfig]:
    """D1 sources whose rows a prune may delete: mark capture (the read-only captures never
    write to their table) with a retention of more than 0 days."""
    return {
        name: cfg
        for name, cfg in settings.sources.items()
        if isinstance(cfg, D1SourceConfig)
        and cfg.capture == "mark"
        and settings.retention.days_for(name) > 0
    }


def _jobs(
    settings: Settings, stores: _Stores, only: Kind | None, now: datetime, dry_run: bool
) -> list[Job]:
    r = settings.retention
    size = r.batch_size
    jobs: list[Job] = []
    wanted = KINDS if only is None else (only,)
    if "d1" in wanted:
        for name, cfg in prunable_sources(settings).items():
            cutoff = now - r.days_for(name) * DAY

            def d1(name: str = name, cfg: D1SourceConfig = cfg, cutoff: datetime = cutoff) -> Tally:
                return _prune_d1(settings, name, cfg, cutoff, dry_run)

            jobs.append((f"d1:{name}", d1))
    # Each kind's cutoff has a name of its own: the jobs run after this function returns.
    letters_cutoff = now - r.letters_days * DAY
    runs_cutoff = now - r.runs_days * DAY
    if "letters" in wanted and r.letters_days:
        jobs.append(
            ("letters", lambda: prune_letters(stores.get("state"), letters_cutoff, size, dry_run))
        )
    if "runs" in wanted and r.runs_days:
        jobs.append(
            (
                "source_runs",
                lambda: SOURCE_RUNS.prune(stores.get("state"), runs_cutoff, size, dry_run),
            )
        )
        for sink in settings.sinks_used:
            if sink == "d1":
                continue  # the remote D1 sink's history is left to D1's own retention
            rollup = ingestion_runs(sink)

            def runs(sink: str = sink, rollup: Rollup = rollup) -> Tally:
                return rollup.prune(stores.get(sink), runs_cutoff, size, dry_run)

            jobs.append((f"ingestion_runs:{sink}", runs))
    if "cache" in wanted and r.cache_days:
        before_ms = int((now - r.cache_days * DAY).timestamp() * 1000)
        for sink in settings.stream("cache").sinks:
            if sink == "d1":
                continue

            def cache(sink: str = sink) -> Tally:
                return prune_cache(stores.get(sink), before_ms, size, dry_run)

            jobs.append((f"cache:{sink}", cache))
    return jobs


def _prune_d1(
    settings: Settings, name: str, cfg: D1SourceConfig, cutoff: datetime, dry_run: bool
) -> Tally:
    stream = settings.stream(cfg.stream)
    try:
        checks: dict[str, KeyCheck] = open_key_checks(settings, stream.sinks)
    except SinkUnavailableError as exc:
        tally = Tally(unavailable=True)
        tally.notes.append(
            f"sink {exc.context.get('sink', '?')} could not be reached ({exc.message}):"
            " nothing was deleted"
        )
        return tally
    try:
        return prune_d1_source(name, cfg, settings, checks, cutoff, dry_run=dry_run)
    finally:
        for check in checks.values():
            check.close()


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, sqlalchemy.exc.OperationalError | psycopg2.OperationalError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return True
    return bool(isinstance(exc, SluiceError) and exc.transient)


def run_prune(
    settings: Settings,
    *,
    only: Kind | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[PruneResult]:
    """Prune every configured target (or those of one kind); one result per target, in order.
    A real run records each target in `prune_runs`."""
    now = now or datetime.now(UTC)
    stores = _Stores(settings)
    results: list[PruneResult] = []
    try:
        for target, job in _jobs(settings, stores, only, now, dry_run):
            started = datetime.now(UTC)
            t0 = time.perf_counter()
            result = PruneResult(target)
            try:
                tally = job()
                result.deleted, result.kept = tally.deleted, tally.kept
                result.notes += tally.notes
                result.unavailable = tally.unavailable
                if tally.unavailable:
                    result.status = "partial" if tally.deleted else "failed"
            except _DATABASE_ERRORS as exc:
                result.status = "failed"
                result.unavailable = _unreachable(exc)
                result.notes.append(_one_line(exc))
                log.warning("prune %s failed: %s", target, exc)
            result.seconds = time.perf_counter() - t0
            if not dry_run:
                _record(stores, result, started)
            results.append(result)
    finally:
        stores.close()
    return results


def _record(stores: _Stores, result: PruneResult, started: datetime) -> None:
    """A row of `prune_runs`; a state store that cannot take it is noted on the result."""
    try:
        store = stores.get("state")
        with store.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO prune_runs (target, started_at, finished_at, status, deleted,"
                    " kept, note) VALUES (:t, :s, :f, :st, :d, :k, :n)"
                ),
                {
                    "t": result.target,
                    "s": store.ts(started),
                    "f": store.now(),
                    "st": result.status,
                    "d": result.deleted,
                    "k": result.kept,
                    "n": "; ".join(result.notes)[:2000] or None,
                },
            )
    except (SluiceError, sqlalchemy.exc.SQLAlchemyError) as exc:
        if "prune_runs" in str(exc):  # a store the schema was not upgraded on
            result.notes.append("not recorded: no prune_runs table (run `sluice migrate`)")
            result.status = "failed"
            return
        result.notes.append(f"not recorded in prune_runs: {_one_line(exc)}")
        result.unavailable = result.unavailable or _unreachable(exc)


def _one_line(exc: BaseException) -> str:
    text_ = str(exc).strip()
    return text_.splitlines()[0][:300] if text_ else type(exc).__name__


def summary(results: Sequence[PruneResult]) -> dict[str, Any]:
    """What the scheduled task logs and returns: per target, its counts and status."""
    return {r.target: r.as_dict() for r in results}

"""The record of prunes (`prune_runs`): written by ops/prune.py, read by `sluice status`."""

from __future__ import annotations

from typing import Any

import sqlalchemy.exc
from sqlalchemy import text

from sluice.shared.state import StateStore, read_time


def last_prunes(store: StateStore) -> dict[str, dict[str, Any]]:
    """The latest prune of each target, by target; empty when none ran (or the store predates
    the `prune_runs` table: nothing was ever pruned there)."""
    try:
        with store.read() as conn:
            rows = conn.execute(
                text(
                    "SELECT target, status, deleted, kept, started_at, finished_at, note"
                    " FROM prune_runs WHERE id IN (SELECT max(id) FROM prune_runs GROUP BY target)"
                    " ORDER BY target"
                )
            ).all()
    except sqlalchemy.exc.ProgrammingError as exc:  # PostgreSQL: no such table
        if "prune_runs" in str(exc):
            return {}
        raise
    except sqlalchemy.exc.OperationalError as exc:  # SQLite: no such table
        if "no such table" in str(exc):
            return {}
        raise
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        started, finished = read_time(r[4]), read_time(r[5])
        out[str(r[0])] = {
            "status": str(r[1]),
            "deleted": int(r[2]),
            "kept": int(r[3]),
            "started_at": started,
            "seconds": round((finished - started).total_seconds(), 3)
            if started and finished
            else None,
            "note": r[6],
        }
    return out

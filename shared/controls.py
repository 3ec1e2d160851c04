"""Operators' controls over sources, kept in the state store (`source_controls`): a paused source
is skipped by beat and `sluice produce`, which say so, until it is resumed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from sluice.shared.state import StateStore


@dataclass(frozen=True)
class Control:
    source: str
    paused: bool
    reason: str | None
    changed_at: Any  # a time as the store holds it


def controls(store: StateStore) -> dict[str, Control]:
    """Every source an operator has paused or resumed, by name."""
    with store.read() as conn:
        rows = conn.execute(
            text("SELECT source, paused, reason, changed_at FROM source_controls")
        ).all()
    return {r[0]: Control(r[0], bool(r[1]), r[2], r[3]) for r in rows}


def paused(store: StateStore, source: str) -> Control | None:
    """The control of a paused source, or None when it runs."""
    with store.read() as conn:
        row = conn.execute(
            text(
                "SELECT source, paused, reason, changed_at FROM source_controls WHERE source = :s"
            ),
            {"s": source},
        ).first()
    if row is None or not row[1]:
        return None
    return Control(row[0], True, row[2], row[3])


def set_paused(store: StateStore, source: str, pause: bool, reason: str | None = None) -> None:
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO source_controls (source, paused, reason, changed_at)"
                " VALUES (:s, :p, :r, :now) ON CONFLICT (source) DO UPDATE SET"
                " paused = excluded.paused, reason = excluded.reason,"
                " changed_at = excluded.changed_at"
            ),
            {"s": source, "p": pause, "r": reason, "now": store.now()},
        )

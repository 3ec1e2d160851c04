"""Incremental cursors of HTTP sources, one per source and partition (symbol, pair, point),
in the state store's `source_progress` table (shared/state.py).

A cursor is a UTC time ("2024-01-01T00:00:00Z", fixed width so text order is time order):
everything before it has been committed by every sink. It only moves forward and only over a
contiguous window: a window [start, end) advances it to `end` when the cursor already reaches
`start`. A window acknowledged before an earlier one (acknowledgements arrive in any order) leaves
the cursor where it is; the next run then fetches it again (the keyed writes absorb the repeat),
so a lost earlier window can never be skipped over.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from sluice.shared.state import StateStore

CURSOR_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_cursor(t: datetime) -> str:
    return t.astimezone(UTC).strftime(CURSOR_FORMAT)


def parse_cursor(value: str) -> datetime:
    return datetime.strptime(value, CURSOR_FORMAT).replace(tzinfo=UTC)


class CursorStore:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def get_all(self, source: str) -> dict[str, datetime]:
        with self.store.read() as conn:
            rows = conn.execute(
                text("SELECT partition, cursor FROM source_progress WHERE source = :s"),
                {"s": source},
            ).fetchall()
        return {str(p): parse_cursor(str(c)) for p, c in rows}

    def advance(
        self, source: str, partition: str, start: datetime, end: datetime, first: bool
    ) -> bool:
        """Move the cursor to `end` if it reaches `start`; a partition's first window (`first`:
        fetched without a cursor) creates it. True when the cursor moved."""
        params = {
            "s": source,
            "p": partition,
            "start": format_cursor(start),
            "end": format_cursor(end),
            "now": self.store.now(),
        }
        with self.store.write() as conn:
            moved = conn.execute(
                text(
                    "UPDATE source_progress SET cursor = :end, updated_at = :now"
                    " WHERE source = :s AND partition = :p AND cursor >= :start"
                    " AND cursor < :end"
                ),
                params,
            ).rowcount
            if moved or not first:
                return bool(moved)
            inserted = conn.execute(
                text(
                    "INSERT INTO source_progress (source, partition, cursor, updated_at)"
                    " VALUES (:s, :p, :end, :now) ON CONFLICT (source, partition) DO NOTHING"
                ),
                params,
            ).rowcount
            return bool(inserted)

    def set(self, source: str, partition: str, cursor: datetime) -> None:
        """Operator override (tests, a reset): put the cursor exactly here."""
        with self.store.write() as conn:
            conn.execute(
                text(
                    "INSERT INTO source_progress (source, partition, cursor, updated_at)"
                    " VALUES (:s, :p, :c, :now) ON CONFLICT (source, partition) DO UPDATE SET"
                    " cursor = excluded.cursor, updated_at = excluded.updated_at"
                ),
                {"s": source, "p": partition, "c": format_cursor(cursor), "now": self.store.now()},
            )

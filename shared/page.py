"""The page: the unit on the queue. One stream, one sink, up to page_size records.

On the wire a page is a plain dict (serialised by Celery with msgpack): rows are lists in the order
of `columns`, which keeps messages small and decoding cheap. `decode` checks the shape and raises
MessageError naming what was wrong, so a malformed message is dead-lettered, never retried forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import MessageError

WIRE_VERSION = 1


@dataclass
class Page:
    id: str
    stream: str
    sink: str
    source: str
    run: str
    columns: list[str]
    rows: Sequence[Sequence[Any]]

    def encode(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "id": self.id,
            "stream": self.stream,
            "sink": self.sink,
            "source": self.source,
            "run": self.run,
            "columns": self.columns,
            "rows": self.rows,
        }

    def for_sink(self, sink: str) -> Page:
        return Page(self.id, self.stream, sink, self.source, self.run, self.columns, self.rows)


def decode(body: object) -> Page:
    if not isinstance(body, dict):
        raise MessageError(f"page body must be a mapping, got {type(body).__name__}")
    if body.get("v") != WIRE_VERSION:
        raise MessageError(f"unsupported page version {body.get('v')!r}", page=body.get("id"))
    problems = [
        f"{name} must be {kind.__name__}"
        for name, kind in (
            ("id", str),
            ("stream", str),
            ("sink", str),
            ("source", str),
            ("run", str),
            ("columns", list),
            ("rows", list),
        )
        if not isinstance(body.get(name), kind)
    ]
    if problems:
        raise MessageError("malformed page: " + "; ".join(problems), page=body.get("id"))
    return Page(
        body["id"],
        body["stream"],
        body["sink"],
        body["source"],
        body["run"],
        body["columns"],
        body["rows"],
    )

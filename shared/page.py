"""The page: the unit on the queue. One stream, one sink, up to page_size records.

On the wire a page is a plain dict packed with msgpack into one bytes value, the ingest task's only
argument: rows are lists in the order of `columns`, which keeps messages small and decoding cheap.
Packed by us rather than left to Celery, because Celery's consumer loop decodes a message's whole
body once just to tell which protocol it speaks (and the task decodes it again): a body that is
one bytes value costs that loop nothing, and the page is decoded once, in the thread that ingests
it. `decode` also takes the unpacked dict (a page sent by an older producer) and checks the shape,
raising MessageError naming what was wrong, so a malformed message is dead-lettered, never retried
forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from sluice.shared.errors import MessageError

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
    # Source order of the rows: row i is `seq + i` (a producer's page), or `orders[i]` (a replay
    # keeps each record's own). None: unknown (a page sent before orders existed).
    seq: int | None = None
    orders: list[int | None] | None = None
    # "upsert" writes the rows; "delete" removes the rows' keys (rows hold only the key columns).
    op: str = "upsert"

    def order(self, i: int) -> int | None:
        if self.orders is not None:
            return self.orders[i] if i < len(self.orders) else None
        return None if self.seq is None else self.seq + i

    def encode(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": WIRE_VERSION,
            "id": self.id,
            "stream": self.stream,
            "sink": self.sink,
            "source": self.source,
            "run": self.run,
            "columns": self.columns,
            "rows": self.rows,
        }
        # Written only when set, so pages of an older producer and of this one read alike.
        if self.seq is not None:
            body["seq"] = self.seq
        if self.orders is not None:
            body["orders"] = self.orders
        if self.op != "upsert":
            body["op"] = self.op
        return body

    def pack(self) -> bytes:
        """The page as it travels (bytes stay bytes, text stays text, as Celery's msgpack would
        keep them). Raises ValueError, TypeError or OverflowError for a value msgpack cannot carry
        (text with an unpaired surrogate, an integer beyond 64 bits)."""
        packed: bytes = msgpack.packb(self.encode(), use_bin_type=True)
        return packed

    def for_sink(self, sink: str) -> Page:
        return replace(self, sink=sink)


def unpack(body: object) -> object:
    """A packed page's dict (anything else is returned as it is)."""
    if not isinstance(body, bytes):
        return body
    try:
        return msgpack.unpackb(body, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MessageError(f"page body is not msgpack: {exc}") from None


def decode(body: object) -> Page:
    body = unpack(body)
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
    seq, orders, op = body.get("seq"), body.get("orders"), body.get("op", "upsert")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        problems.append("seq must be an integer")
    if orders is not None and not (
        isinstance(orders, list)
        and all(o is None or (isinstance(o, int) and not isinstance(o, bool)) for o in orders)
    ):
        problems.append("orders must be a list of integers")
    if op not in ("upsert", "delete"):
        problems.append(f"op must be 'upsert' or 'delete', got {op!r}")
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
        seq,
        orders,
        op,
    )

"""The Source interface: where records come from.

A source reads pages of records after a resume point and, once every sink has committed a page,
acknowledges it (D1: sets processed_at on its rows). Acknowledging twice must be harmless.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.streams import Stream


@dataclass
class SourcePage:
    rows: Sequence[Sequence[Any]]  # in the stream's column order
    ack: Any  # what `acknowledge` needs (msgpack-serialisable)
    last_key: Any  # where the next page starts (keyset)
    # The page's stream when the source feeds several (a KV namespace); None: `source.stream`.
    stream: str | None = None


class Source(Protocol):
    name: str
    stream: Stream  # the stream of pages that name none (SourcePage.stream)

    def pages(self, after: Any | None, max_pages: int) -> Iterator[SourcePage]: ...

    def acknowledge(self, ack: Any) -> None: ...

    def close(self) -> None: ...

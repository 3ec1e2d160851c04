"""Dead-letter filters as the console receives them (query strings, forms, JSON bodies), turned
into the data layer's `Filters`. One place, so the page, its forms and the API select alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, Field

from sluice.ops.dlq import STATUSES, Filters
from sluice.shared.errors import SluiceError

#: The filters a listing, a count, a group view and a bulk action all take.
FIELDS = ("source", "stream", "sink", "error_class", "status", "since", "until", "text")


class LetterSelection(BaseModel):
    """Which dead letters: every field narrows the selection (empty: no narrowing)."""

    source: str | None = Field(None, description="the source that produced the record")
    stream: str | None = Field(None, description="the stream")
    sink: str | None = Field(None, description="the sink that refused it: postgres, sqlite, …")
    error_class: str | None = Field(None, description="exactly this error class")
    status: str | None = Field("pending", description="pending, replayed or discarded; '': any")
    since: str | None = Field(None, description="failed at or after: ISO-8601, or 30m/2h/7d ago")
    until: str | None = Field(None, description="failed before: ISO-8601, or 30m/2h/7d ago")
    text: str | None = Field(None, description="substring of the key, error class or message")
    ids: list[int] | None = Field(None, description="only these letters")

    def filters(self, after_id: int | None = None) -> Filters:
        values = {k: (v.strip() or None) if isinstance(v, str) else v for k, v in self}
        status = values.get("status")
        if status is not None and status not in STATUSES:
            raise SluiceError(f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
        return Filters(
            ids=list(self.ids) if self.ids else None,
            source=values["source"],
            stream=values["stream"],
            sink=values["sink"],
            error_class=values["error_class"],
            status=status,
            since=values["since"],
            until=values["until"],
            text=values["text"],
            after_id=after_id,
        )

    def query(self, **extra: Any) -> str:
        """The selection as a query string (the page's links keep it)."""
        pairs = [(k, getattr(self, k) or "") for k in FIELDS]
        pairs += [(k, v) for k, v in extra.items() if v is not None]
        return urlencode([(k, v) for k, v in pairs if v != "" or k == "status"])


def from_mapping(values: Mapping[str, Any]) -> LetterSelection:
    """A selection from a query string or a form; a missing status means pending, an empty one
    any status."""
    found: dict[str, Any] = {k: values.get(k) for k in FIELDS if k in values}
    if "status" not in values:
        found["status"] = "pending"
    ids = values.get("ids")
    if ids:
        try:
            found["ids"] = [int(i) for i in str(ids).replace(",", " ").split()]
        except ValueError:
            raise SluiceError(f"ids: expected numbers, got {ids!r}") from None
    return LetterSelection(**found)

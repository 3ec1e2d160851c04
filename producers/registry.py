"""Open a configured source by name."""

from __future__ import annotations

from producers.d1_source import open_d1_source
from producers.source import Source
from shared.errors import SourceError
from shared.settings import Settings


def open_source(settings: Settings, name: str) -> Source:
    cfg = settings.sources.get(name)
    if cfg is None:
        known = ", ".join(sorted(settings.sources)) or "none configured"
        raise SourceError(f"unknown source {name!r} (known: {known})", source=name)
    return open_d1_source(name, cfg, settings)

"""How big each local D1 source's database is, so an alert fires before D1's 10 GB limit.

The size is SQLite's own count (page_count * page_size), read on a read-only connection: it
includes pages still in the write-ahead log and equals the file's length once checkpointed.
Remote D1 databases are not measured here: asking the REST API at every scrape would spend
requests of the token's rate limit; the Cloudflare dashboard shows their size.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sluice.shared.settings import D1SourceConfig, Settings
from sluice.shared.wrangler import d1_path

CONNECT_TIMEOUT = 3.0


def local_d1_file(cfg: D1SourceConfig) -> Path | None:
    """The SQLite file a local D1 source reads (its `path`, or wrangler's file for its id)."""
    if cfg.mode != "local":
        return None
    if cfg.path:
        return Path(cfg.path)
    if cfg.wrangler_state and cfg.database_id:
        return d1_path(Path(cfg.wrangler_state), cfg.database_id)
    return None


def database_size(path: Path) -> int:
    """Bytes of the SQLite database at path; an error if it does not exist."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=CONNECT_TIMEOUT)
    try:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    return int(pages) * int(page_size)


def d1_database_sizes(settings: Settings, errors: dict[str, str]) -> dict[str, int]:
    """Per local D1 source, by name, its database's size in bytes. A file that cannot be read
    is left out and named in `errors` (one missing file must not hide the others' sizes)."""
    sizes: dict[str, int] = {}
    for name, cfg in sorted(settings.sources.items()):
        if not isinstance(cfg, D1SourceConfig):
            continue
        path = local_d1_file(cfg)
        if path is None:
            continue
        try:
            sizes[name] = database_size(path)
        except sqlite3.Error as exc:
            errors[f"d1_size:{name}"] = f"{path}: {exc}"
    return sizes

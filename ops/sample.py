"""A deterministic sample D1 file of usage events, for `sluice demo`, tests and benchmarks.

About 10% of the rows repeat an earlier idempotency key (with a new id: a retried client call), and
a handful are invalid in the ways real data is (NUL bytes, text in a number column, a broken
timestamp or JSON, a missing or oversized field). The same seed always gives the same rows.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from sluice.shared.migrations import SCHEMA_DIR, split_statements

METRICS = [
    ("api_calls", "count"),
    ("storage", "bytes"),
    ("compute", "seconds"),
    ("bandwidth", "bytes"),
    ("tokens", "count"),
    ("messages", "count"),
    ("queries", "count"),
    ("memory", "mb_hours"),
]
REGIONS = ["eu-west", "us-east", "us-west", "ap-south"]
SDKS = ["py/1.4.2", "js/2.0.1", "go/0.9.0"]

# Each invalid row breaks one rule: (column to break, bad value, note).
INVALID = [
    ("organisation_id", "org\x00nul", "NUL byte"),
    ("metric_value", "not-a-number", "text in a number column"),
    ("timestamp", "yesterday at noon", "unparseable timestamp"),
    ("metadata", "{broken json", "malformed JSON"),
    ("organisation_id", None, "missing required field"),
    ("metric_name", "m" * 300, "oversized value"),
    ("idempotency_key", "", "empty key"),
    ("timestamp", None, "missing timestamp"),
    ("metric_value", None, "missing value"),
    ("unit", "u" * 100, "oversized unit"),
]
COLUMNS = (
    "id",
    "organisation_id",
    "project_id",
    "idempotency_key",
    "metric_name",
    "metric_value",
    "unit",
    "timestamp",
    "metadata",
)


@dataclass
class Sample:
    path: Path
    records: int
    distinct_valid_keys: set[str]
    invalid: int


def generate_rows(n: int, seed: int = 20261124) -> tuple[list[tuple[object, ...]], set[str], int]:
    rng = random.Random(seed)
    rows: list[tuple[object, ...]] = []
    keys: list[str] = []
    n_invalid = min(len(INVALID), max(1, n // 1000)) if n >= 10 else 0
    invalid_at = set(rng.sample(range(n), n_invalid)) if n_invalid else set()
    bad = iter(INVALID)
    valid_keys: set[str] = set()
    t0 = 1_764_000_000  # 2025-11-24T16:00:00Z
    for i in range(n):
        rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if keys and i not in invalid_at and rng.random() < 0.10:
            # A repeat: half from the recent past (often the same page), half from anywhere.
            back = rng.randrange(min(len(keys), 5000)) if rng.random() < 0.5 else None
            key = keys[-1 - back] if back is not None else keys[rng.randrange(len(keys))]
        else:
            key = f"idem_{rng.getrandbits(96):024x}"
        org = rng.randrange(200)
        metric, unit = METRICS[rng.randrange(len(METRICS))]
        ts = t0 + i * 0.5 + rng.random()
        ts_text = _iso(ts)
        meta = (
            f'{{"region":"{REGIONS[rng.randrange(4)]}","sdk":"{SDKS[rng.randrange(3)]}",'
            f'"host":"h{rng.randrange(1000):03d}"}}'
        )
        row: list[object] = [
            rid,
            f"org_{org:04d}",
            f"proj_{org:04d}_{rng.randrange(10)}",
            key,
            metric,
            round(rng.random() * 1000, 3),
            unit,
            ts_text,
            meta,
        ]
        if i in invalid_at:
            col, value, _ = next(bad)
            row[COLUMNS.index(col)] = value
            if col != "idempotency_key":
                row[3] = f"idem_bad_{i}"
        else:
            keys.append(key)
            valid_keys.add(key)
        rows.append(tuple(row))
    return rows, valid_keys, n_invalid


def _iso(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def write_d1_file(path: Path, n: int, seed: int = 20261124) -> Sample:
    """A fresh D1-shaped SQLite file (schema/d1_source) holding n unprocessed usage events."""
    rows, valid, n_invalid = generate_rows(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        # The random-key primary key of a million rows does not fit SQLite's default 2 MB cache:
        # its pages would be spilled and rewritten many times over. A cache as large as the file
        # writes each page once (ops/performance.md). Memory only while the sample is written.
        conn.execute(f"PRAGMA cache_size={-max(2048, n // 2)}")  # KiB: about a KB per row
        for stmt in split_statements((SCHEMA_DIR / "d1_source" / "usage_events.sql").read_text()):
            conn.execute(stmt)
        cols = ", ".join(f'"{c}"' for c in COLUMNS)
        conn.executemany(f"INSERT INTO usage_events ({cols}) VALUES ({', '.join('?' * 9)})", rows)
        conn.commit()
    finally:
        conn.close()
    return Sample(path, n, valid, n_invalid)

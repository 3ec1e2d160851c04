"""Property: for any mix of valid, invalid and repeated records spread over pages, each sink ends
with exactly the distinct valid keys, and the dead letters are exactly the invalid records.

Pages go through the real ingest task (in-process) into real PostgreSQL and SQLite; dead letters
are read back from the real `dead_letter` queue on Redis.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.consumers.ingest import ingest
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.page import Page
from sluice.shared.records import record_key
from sluice.shared.settings import Settings
from sluice.shared.streams import USAGE_EVENTS
from tests.conftest import Env
from tests.helpers import pg_keys, sqlite_keys

# What makes a record invalid (column index, bad value), one per generated invalid record.
BREAKS = [
    (1, None),
    (1, "nul\x00"),
    (5, "12"),
    (5, float("nan")),
    (7, "not a time"),
    (8, "{oops"),
    (3, ""),
]


def record(prefix: str, key: int, version: int) -> list[Any]:
    return [
        f"{prefix}-id-{key}-{version}",
        "org_1",
        None,
        f"{prefix}-k{key}",
        "api_calls",
        float(version),
        "count",
        "2026-11-25T12:00:00Z",
        '{"v":1}',
    ]


@st.composite
def pages(draw: st.DrawFn) -> list[list[tuple[int, int, int | None]]]:
    """Pages of (key, version, break index or None)."""
    n_pages = draw(st.integers(1, 4))
    return [
        draw(
            st.lists(
                st.tuples(
                    st.integers(0, 30),
                    st.integers(0, 3),
                    st.one_of(st.none(), st.integers(0, len(BREAKS) - 1)),
                ),
                max_size=40,
            )
        )
        for _ in range(n_pages)
    ]


def drain_dead_letters(ctx: Context) -> list[dict[str, Any]]:
    letters = []
    while (raw := ctx.redis.rpop("dead_letter")) is not None:
        msg = json.loads(raw)
        args = msgpack.unpackb(base64.b64decode(msg["body"]))[0]
        letters.extend(args[0])
    return letters


@pytest.fixture
def ctx(env: Env) -> Context:
    env.write_config("")
    migrate_sqlite(env.sqlite_path)
    return app.configure(Settings.load(env.vars))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=pages())
def test_sinks_hold_distinct_valid_keys_and_dead_letters_are_the_invalid(
    env: Env, ctx: Context, spec: list[list[tuple[int, int, int | None]]]
) -> None:
    prefix = uuid.uuid4().hex[:8]  # isolates this example's keys in the shared databases
    valid_keys: set[str] = set()
    invalid: set[str] = set()
    seen_ids: set[str] = set()
    for page_spec in spec:
        rows = []
        for key, version, broken in page_spec:
            row = record(prefix, key, version)
            if broken is not None:
                col, value = BREAKS[broken]
                row[0] = row[3] = f"{prefix}-bad-{uuid.uuid4().hex[:8]}"
                row[col] = value
                invalid.add(record_key(USAGE_EVENTS, row))
            elif row[0] in seen_ids:
                continue  # same id, same record: a plain redelivery, also fine to skip here
            else:
                valid_keys.add(row[3])
            seen_ids.add(row[0])
            rows.append(row)
        page_id = uuid.uuid4().hex
        for sink in ("postgres", "sqlite"):
            page = Page(
                page_id, "usage_events", sink, "prop", "run", list(USAGE_EVENTS.column_names), rows
            )
            ingest.apply(args=[page.encode()]).get()
    for keys in (pg_keys(env.pg_url), sqlite_keys(env.sqlite_path)):
        mine = {k: n for k, n in keys.items() if k.startswith(prefix)}
        assert set(mine) == valid_keys
        assert all(n == 1 for n in mine.values())
    letters = drain_dead_letters(ctx)
    assert sorted(d["record_key"] for d in letters if d["sink"] == "postgres") == sorted(invalid)
    assert sorted(d["record_key"] for d in letters if d["sink"] == "sqlite") == sorted(invalid)

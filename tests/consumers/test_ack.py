"""Acknowledging a page: done by the ingest task of the last sink to commit, in its own process;
when that attempt fails (here: the D1 file is locked by someone else) the retrying ack task takes
over, so the rows are still marked, later, and never before the commit."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from sluice.consumers.ack import ack_page
from sluice.consumers.ingest import ingest
from sluice.ops.sample import write_d1_file
from sluice.producers.registry import open_source
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.database import sqlite_connect
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.page import Page
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config, d1_processed


def _one_page(env: Env, ctx: Context, sink: str) -> Page:
    """The first page of the D1 source, registered as in flight for that sink only."""
    source = open_source(ctx.settings, "d1_usage")
    sp = next(source.pages(None, 1))
    source.close()
    page_id = uuid.uuid4().hex
    ctx.progress.register("d1_usage", page_id, [sink], sp.ack, sp.last_key)
    columns = list(ctx.settings.stream("usage_events").column_names)
    return Page(page_id, "usage_events", sink, "d1_usage", "run", columns, sp.rows)


def _configure(env: Env, records: int, sink: str = "postgres") -> tuple[Context, Page]:
    """A D1 file of valid records only: a page with dead letters is acknowledged by the
    dead-letter task once they are stored (tests/pipeline/test_fidelity.py), not inline."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, records)
    conn = sqlite_connect(d1)
    conn.execute(
        "DELETE FROM usage_events WHERE idempotency_key = '' OR idempotency_key LIKE 'idem_bad_%'"
    )
    conn.close()
    config = d1_config(d1, page_size=records).replace(
        "[pipeline]\n", "[pipeline]\nsqlite_busy_timeout_ms = 200\n"
    )
    env.write_config(config)
    migrate_sqlite(env.sqlite_path)
    ctx = app.configure(Settings.load(env.vars))
    return ctx, _one_page(env, ctx, sink)


@pytest.mark.parametrize("sink", ["postgres", "sqlite"])
def test_last_sink_marks_the_rows_itself(env: Env, sink: str) -> None:
    ctx, page = _configure(env, 40, sink)
    ingest.apply(args=[page.encode()]).get()
    assert d1_processed(env.dir / "d1.sqlite") == (39, 39)
    assert ctx.progress.in_flight("d1_usage") == 0
    assert ctx.redis.llen("progress") == 0  # no ack task was needed


def test_failed_inline_ack_becomes_the_retrying_task(env: Env) -> None:
    ctx, page = _configure(env, 40)
    d1 = env.dir / "d1.sqlite"
    holder = sqlite_connect(d1)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the file past the busy timeout
    try:
        ingest.apply(args=[page.encode()]).get()
        assert d1_processed(d1) == (39, 0)
        assert ctx.progress.in_flight("d1_usage") == 1
        assert ctx.redis.llen("progress") == 1  # sluice.ack_page, for a worker to retry
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    ack_page.apply(args=["d1_usage", page.id]).get()
    assert d1_processed(d1) == (39, 39)
    assert ctx.progress.in_flight("d1_usage") == 0


def test_threads_open_one_source_between_them(env: Env) -> None:
    """The threads of a threads-pool worker acknowledging their first pages at once share one
    source: each opening its own left all but one connection unclosed."""
    opened: list[object] = []
    start = threading.Barrier(8)

    def open_slowly(settings: Settings, name: str) -> object:
        time.sleep(0.05)  # an open that takes a while widens the window the lock closes
        opened.append(object())
        return opened[-1]

    ctx = Context(Settings.load(env.vars), open_slowly)

    def first_use() -> object:
        start.wait()
        return ctx.source("d1_usage")

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: first_use(), range(8)))
    assert len(opened) == 1
    assert all(s is opened[0] for s in got)

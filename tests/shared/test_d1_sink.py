"""The remote D1 sink against the fake D1 REST API (tests/fakes/d1_server.py) on 127.0.0.1.

The fake runs every batch in one transaction of a real SQLite file, with D1's limits enforced, so
constraints, ON CONFLICT and rollback are real; what it received is asserted on.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sluice.consumers.ingest import ingest
from sluice.ops.metrics import SluiceCollector
from sluice.ops.sample import generate_rows, write_d1_file
from sluice.ops.status import collect_status
from sluice.ops.workers import WorkerPool
from sluice.shared.celery_app import QUEUES, app
from sluice.shared.cloudflare import D1Client
from sluice.shared.errors import (
    ConfigError,
    D1Error,
    ForeignKeyViolationError,
    RejectedBySinkError,
    SinkError,
    TransientSinkError,
)
from sluice.shared.migrations import migrate_d1
from sluice.shared.page import Page
from sluice.shared.records import Validator, dedupe
from sluice.shared.settings import D1SinkConfig, Settings
from sluice.shared.sinks import PageMeta
from sluice.shared.sinks.d1 import D1Sink, classify, statement_bytes
from sluice.shared.streams import HISTORICAL_PRICES, USAGE_EVENTS, Stream
from tests.conftest import Env
from tests.fakes.d1_server import FakeD1
from tests.helpers import d1_processed, drain, pg_scalar, sqlite_keys
from tests.ops.test_cli import ROOT

DB_ID = "7c1f6f4e-0d1e-4b8e-9a57-2f4e5d6c7b8a"
TOKEN_ENV = "TEST_D1_SINK_TOKEN"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """The SQLite file behind the fake's database (read directly to check what landed)."""
    return tmp_path / "remote-d1.sqlite"


@pytest.fixture
def fake(remote: Path) -> Iterator[FakeD1]:
    with FakeD1() as server:
        server.add_database(DB_ID, remote)
        yield server


@pytest.fixture
def migrated(fake: FakeD1) -> FakeD1:
    with _client(fake) as client:
        migrate_d1(client)
    fake.requests.clear()
    return fake


def _client(fake: FakeD1) -> D1Client:
    return D1Client(
        account_id=fake.account_id, database_id=DB_ID, api_token=fake.token, base_url=fake.base_url
    )


def make_sink(fake: FakeD1, max_attempts: int = 3, sleeps: list[float] | None = None) -> D1Sink:
    cfg = D1SinkConfig(
        account_id=fake.account_id,
        database_id=DB_ID,
        base_url=fake.base_url,
        api_token_env=TOKEN_ENV,
        max_attempts=max_attempts,
    )
    record = sleeps.append if sleeps is not None else None
    return D1Sink(cfg, lambda: fake.token, sleep=record)


def valid_rows(n: int, seed: int = 7) -> list[list[Any]]:
    rows, _, _ = generate_rows(n, seed=seed)
    good, _ = Validator(USAGE_EVENTS).validate(USAGE_EVENTS.column_names, [list(r) for r in rows])
    return good


def meta(page_id: str, received: int) -> PageMeta:
    return PageMeta(page_id, "test", "run-1", received, 0, 1, datetime.now(UTC))


def remote_scalar(path: Path, sql: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def batches(fake: FakeD1) -> list[list[dict[str, Any]]]:
    return [
        r.body["batch"] for r in fake.requests if isinstance(r.body, dict) and "batch" in r.body
    ]


def assert_within_d1_limits(fake: FakeD1) -> int:
    """Every statement the fake received keeps to 100 bound parameters and 100 KB (SQL text, and
    SQL text plus its values). Returns how many statements were checked."""
    checked = 0
    for batch in batches(fake):
        for stmt in batch:
            params = stmt.get("params", [])
            assert len(params) <= 100
            assert len(stmt["sql"].encode("utf-8")) <= 100_000
            assert statement_bytes(stmt["sql"], params) <= 100_000
            checked += 1
    return checked


def refuse_negative_values(remote: Path) -> None:
    """A rule D1 enforces but the stream does not know, so validation lets it through."""
    conn = sqlite3.connect(remote)
    conn.execute(
        "CREATE TRIGGER refuse_negative BEFORE INSERT ON usage_events"
        " WHEN NEW.metric_value < 0 BEGIN SELECT RAISE(ABORT, 'metric_value must be"
        " non-negative'); END"
    )
    conn.commit()
    conn.close()


# -- migrations ---------------------------------------------------------------------------------


def test_migrate_applies_the_sqlite_schema_through_the_api_once(fake: FakeD1, remote: Path) -> None:
    with _client(fake) as client:
        first = migrate_d1(client)
        again = migrate_d1(client)
    shipped = sorted(f.stem for f in (ROOT / "schema" / "sqlite").glob("*.sql"))
    assert first == shipped and first[:2] == ["0001_core", "0002_prices_timeseries"]
    assert again == []
    assert remote_scalar(remote, "SELECT count(*) FROM sluice_migrations") == len(shipped)
    for table in ("usage_events", "ingestion_runs", "historical_prices", "timeseries"):
        assert remote_scalar(remote, f"SELECT count(*) FROM sqlite_master WHERE name = '{table}'")
    # Each file went as one batch (one transaction) with its version row.
    file_batches = batches(fake)
    assert len(file_batches) == len(shipped)
    assert all("sluice_migrations" in b[-1]["sql"] for b in file_batches)
    assert all(r.authorized for r in fake.requests)


def test_sluice_migrate_cli_reaches_the_remote_d1(
    env: Env, fake: FakeD1, remote: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.ops.cli import main

    env.write_config(d1_sink_toml(fake))
    for key, value in {**env.vars, TOKEN_ENV: fake.token}.items():
        monkeypatch.setenv(key, value)
    assert main(["migrate", "--sink", "d1"]) == 0
    assert remote_scalar(remote, "SELECT count(*) FROM sluice_migrations") == len(
        list((ROOT / "schema" / "sqlite").glob("*.sql"))
    )


# -- writes -------------------------------------------------------------------------------------


def test_page_lands_exactly_once_in_one_batch(migrated: FakeD1, remote: Path) -> None:
    sink = make_sink(migrated)
    rows = valid_rows(2_000)
    page = dedupe(USAGE_EVENTS, rows)
    first = sink.write(USAGE_EVENTS, page, meta("p1", len(rows)))
    assert (first.inserted, first.duplicates) == (len(page), len(rows) - len(page))
    assert len(batches(migrated)) == 1 and len(migrated.requests) == 1  # the page is one batch
    assert set(sqlite_keys(remote)) == {r[3] for r in page}

    # The same page again (a redelivery): recognised, nothing written, the counts kept.
    again = sink.write(USAGE_EVENTS, page, meta("p1", len(rows)))
    assert again.already_committed and again.inserted == 0
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == len(page)
    assert remote_scalar(remote, "SELECT inserted FROM ingestion_runs WHERE page_id = 'p1'") == len(
        page
    )
    # The same records in another page: all duplicates, by key.
    other = sink.write(USAGE_EVENTS, page, meta("p2", len(page)))
    assert (other.inserted, other.duplicates) == (0, len(page))
    assert max(sqlite_keys(remote).values()) == 1
    assert assert_within_d1_limits(migrated) > 2 * 180  # 2,000 rows: 182 inserts in the 1st batch
    sink.close()


def test_statements_are_chunked_by_bytes_as_well_as_parameters(
    migrated: FakeD1, remote: Path
) -> None:
    sink = make_sink(migrated)
    rows = dedupe(USAGE_EVENTS, valid_rows(300))
    for i, row in enumerate(rows):
        row[8] = '{"blob": "' + ("x" * 30_000) + f'", "i": {i}}}'  # ~30 KB per row
    result = sink.write(USAGE_EVENTS, rows, meta("big", len(rows)))
    assert result.inserted == len(rows)
    inserts = [s for s in batches(migrated)[0] if s["sql"].startswith('INSERT INTO "usage')]
    # 9 columns and the source order: 10 rows fit 100 parameters, but only 3 rows of 30 KB
    # fit 100 KB.
    assert max(len(s["params"]) for s in inserts) == 3 * 10
    assert sum(len(s["params"]) for s in inserts) == 10 * len(rows)
    assert_within_d1_limits(migrated)
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == len(rows)


def test_a_batch_failing_midway_leaves_nothing(migrated: FakeD1, remote: Path) -> None:
    refuse_negative_values(remote)
    sink = make_sink(migrated)
    rows = dedupe(USAGE_EVENTS, valid_rows(1_000))
    rows[-1][5] = -1.0  # in the last INSERT statement: dozens have run before it
    with pytest.raises(RejectedBySinkError) as failed:
        sink.write(USAGE_EVENTS, rows, meta("half", len(rows)))
    assert "metric_value must be non-negative" in failed.value.message
    assert "SQLITE_CONSTRAINT" in failed.value.message
    inserts = [s for s in batches(migrated)[0] if s["sql"].startswith('INSERT INTO "usage')]
    assert len(inserts) > 50
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == 0
    assert remote_scalar(remote, "SELECT count(*) FROM ingestion_runs") == 0
    # Without the bad record the page commits whole.
    assert (
        sink.write(USAGE_EVENTS, rows[:-1], meta("half", len(rows) - 1)).inserted == len(rows) - 1
    )


def test_update_policy_counts_new_keys_not_updates(migrated: FakeD1, remote: Path) -> None:
    stream = USAGE_EVENTS.with_settings(sinks=("d1",), conflict="update")
    sink = make_sink(migrated)
    rows = dedupe(stream, valid_rows(300))
    sink.write(stream, rows, meta("u1", len(rows)))
    changed = [[*r[:5], 12345.0, *r[6:]] for r in rows[:50]]
    fresh = dedupe(stream, valid_rows(20, seed=99))
    page = dedupe(stream, [*changed, *fresh])
    result = sink.write(stream, page, meta("u2", len(page)))
    # D1's meta.changes counts the 50 updates as changes too: they are `updated`.
    assert (result.inserted, result.updated, result.duplicates) == (len(fresh), 50, 0)
    q = "SELECT count(*) FROM usage_events WHERE metric_value = 12345.0"
    assert remote_scalar(remote, q) == 50
    sink.close()


def test_a_redelivered_page_does_not_undo_a_later_update(migrated: FakeD1, remote: Path) -> None:
    stream = USAGE_EVENTS.with_settings(sinks=("d1",), conflict="update")
    sink = make_sink(migrated)
    rows = dedupe(stream, valid_rows(100))
    sink.write(stream, rows, meta("a", len(rows)))
    later = [[*r[:5], 777.0, *r[6:]] for r in rows]
    sink.write(stream, later, meta("b", len(later)))
    # Page "a" delivered again (its worker died before the ack): recognised, not re-applied.
    assert sink.write(stream, rows, meta("a", len(rows))).already_committed
    q = "SELECT count(*) FROM usage_events WHERE metric_value = 777.0"
    assert remote_scalar(remote, q) == len(rows)
    sink.close()


def test_a_timed_out_write_that_d1_committed_is_not_written_again(
    migrated: FakeD1, remote: Path
) -> None:
    cfg = D1SinkConfig(
        account_id=migrated.account_id,
        database_id=DB_ID,
        base_url=migrated.base_url,
        read_timeout=0.5,
        max_attempts=1,
    )
    sink = D1Sink(cfg, lambda: migrated.token)
    rows = dedupe(USAGE_EVENTS, valid_rows(200))
    migrated.fail_next("delay", seconds=1.5)  # answers after the client gave up, but commits
    with pytest.raises(TransientSinkError, match="timed out"):
        sink.write(USAGE_EVENTS, rows, meta("slow", len(rows)))
    deadline = time.monotonic() + 10
    while not remote_scalar(remote, "SELECT count(*) FROM ingestion_runs"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The page's retry finds it committed: nothing is written twice, the counts stay exact.
    assert sink.write(USAGE_EVENTS, rows, meta("slow", len(rows))).already_committed
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == len(rows)
    q = "SELECT inserted FROM ingestion_runs WHERE page_id = 'slow'"
    assert remote_scalar(remote, q) == len(rows)
    sink.close()


def test_newer_policy_keeps_the_newest_version(migrated: FakeD1, remote: Path) -> None:
    stream = dataclasses.replace(USAGE_EVENTS, conflict="newer", version_column="timestamp")
    sink = make_sink(migrated)
    rows = dedupe(stream, valid_rows(40))
    sink.write(stream, rows, meta("n1", len(rows)))
    later = (datetime.now(UTC) + timedelta(days=3650)).isoformat()
    newer = [[*r[:5], 1.0, r[6], later, r[8]] for r in rows[:10]]
    older = [[*r[:5], 2.0, r[6], "2000-01-01T00:00:00+00:00", r[8]] for r in rows[10:20]]
    sink.write(stream, dedupe(stream, [*newer, *older]), meta("n2", 20))
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events WHERE metric_value = 1.0") == 10
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events WHERE metric_value = 2.0") == 0
    sink.close()


def test_composite_keys_are_counted(migrated: FakeD1, remote: Path) -> None:
    stream: Stream = HISTORICAL_PRICES.with_settings(sinks=("d1",), conflict="update")
    rows = [
        [
            "binance",
            f"SYM{i % 7}",
            "1h",
            f"2026-11-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00",
            *(1.0, 2.0, 0.5, 1.5, 10.0, 15.0, None, i),
        ]
        for i in range(500)
    ]
    rows = dedupe(stream, rows)
    sink = make_sink(migrated)
    first = sink.write(stream, rows, meta("h1", len(rows)))
    assert (first.inserted, first.duplicates) == (len(rows), 0)
    second = sink.write(stream, rows[:100], meta("h2", 100))
    # Re-fetched, equal to what the table holds: unchanged, neither inserted nor duplicates.
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 100)
    assert second.duplicates == 0
    assert remote_scalar(remote, "SELECT count(*) FROM historical_prices") == len(rows)
    assert_within_d1_limits(migrated)


# -- errors -------------------------------------------------------------------------------------


def test_429_with_retry_after_and_html_5xx_are_retried(migrated: FakeD1, remote: Path) -> None:
    sleeps: list[float] = []
    sink = make_sink(migrated, max_attempts=3, sleeps=sleeps)
    migrated.fail_next("rate_limit", retry_after=7)
    migrated.fail_next("server_error", status=502)  # Cloudflare's HTML error page
    rows = dedupe(USAGE_EVENTS, valid_rows(500))
    assert sink.write(USAGE_EVENTS, rows, meta("r1", len(rows))).inserted == len(rows)
    assert sleeps[0] == 7.0  # the server's Retry-After was honoured
    assert len(migrated.requests) == 3
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == len(rows)


def test_errors_are_classified(migrated: FakeD1) -> None:
    sink = make_sink(migrated, max_attempts=1)
    rows = dedupe(USAGE_EVENTS, valid_rows(20))
    for kind, options in (
        ("rate_limit", {"retry_after": 1}),
        ("server_error", {"status": 503}),
        ("reset", {}),
        ("d1_transient", {}),
    ):
        migrated.fail_next(kind, **options)
        with pytest.raises(TransientSinkError):
            sink.write(USAGE_EVENTS, rows, meta("c", len(rows)))
    migrated.fail_next("success_false", message="UNIQUE constraint failed: x.y: SQLITE_CONSTRAINT")
    with pytest.raises(RejectedBySinkError, match="UNIQUE constraint failed"):
        sink.write(USAGE_EVENTS, rows, meta("c", len(rows)))
    assert sink.write(USAGE_EVENTS, rows, meta("c", len(rows))).inserted == len(rows)
    sink.close()
    # A missing parent is a foreign-key error, which the consumer retries before dead-lettering.
    fk = D1Error(
        "FOREIGN KEY constraint failed: SQLITE_CONSTRAINT (extended: SQLITE_CONSTRAINT_FOREIGNKEY)",
        status=400,
        code=7500,
    )
    assert isinstance(classify(fk, "watchlists"), ForeignKeyViolationError)


def test_token_comes_from_the_environment_and_is_never_in_errors(migrated: FakeD1) -> None:
    cfg = D1SinkConfig(account_id=migrated.account_id, database_id=DB_ID, base_url="http://x")
    with pytest.raises(SinkError, match="CLOUDFLARE_API_TOKEN"):
        D1Sink(cfg, lambda: None).write(USAGE_EVENTS, [], meta("t", 0))
    sink = make_sink(migrated, max_attempts=1)
    migrated.fail_next("error", status=403, code=10000, message=f"bad token {migrated.token}")
    with pytest.raises(SinkError) as failed:
        sink.write(USAGE_EVENTS, [], meta("t", 0))
    assert migrated.token not in str(failed.value) and "[redacted]" in str(failed.value)
    assert migrated.token not in repr(sink)


# -- through the ingest task --------------------------------------------------------------------


def d1_sink_toml(fake: FakeD1, max_attempts: int = 3) -> str:
    return f"""
[streams.usage_events]
sinks = ["d1"]

[sinks.d1]
account_id = "{fake.account_id}"
database_id = "{DB_ID}"
base_url = "{fake.base_url}"
api_token_env = "{TOKEN_ENV}"
max_attempts = {max_attempts}
"""


def configure(env: Env, fake: FakeD1, extra: str = "", max_attempts: int = 3) -> Settings:
    env.write_config(d1_sink_toml(fake, max_attempts) + extra)
    env.vars[TOKEN_ENV] = fake.token
    settings = Settings.load(env.vars)
    app.configure(settings)
    return settings


def usage_page(rows: list[list[Any]]) -> Page:
    return Page(
        uuid.uuid4().hex,
        "usage_events",
        "d1",
        "test",
        "run-1",
        list(USAGE_EVENTS.column_names),
        rows,
    )


def wait_dead_letters(env: Env, n: int) -> None:
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("dl", ["dead_letter"], 1)
        deadline = time.monotonic() + 60
        while int(str(pg_scalar(env.pg_url, "SELECT count(*) FROM failed_ingestions"))) < n:
            assert time.monotonic() < deadline, "dead letters never arrived"
            time.sleep(0.1)


def test_transient_errors_go_back_to_the_page_retries(
    env: Env, migrated: FakeD1, remote: Path
) -> None:
    configure(env, migrated, max_attempts=1)  # no retries inside the client: the task's own
    migrated.fail_next("rate_limit", retry_after=1)
    migrated.fail_next("server_error", status=500)
    rows = dedupe(USAGE_EVENTS, valid_rows(300))
    result = ingest.apply(args=[usage_page(rows).encode()]).get()
    assert (result["inserted"], result["dead_letters"]) == (len(rows), 0)
    assert len(migrated.requests) == 3
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == len(rows)


def test_poison_and_oversized_records_are_dead_lettered_and_the_rest_lands(
    env: Env, migrated: FakeD1, remote: Path
) -> None:
    configure(env, migrated)
    refuse_negative_values(remote)
    rows = dedupe(USAGE_EVENTS, valid_rows(1_300))[:1_000]
    poison = {17, 500, 999}
    for i in poison:
        rows[i][5] = -1.0
    # Valid for the stream (100,000 characters of JSON allowed) but 2 bytes per character.
    rows[250][8] = '{"note": "' + "é" * 60_000 + '"}'
    refused = {rows[i][3] for i in poison} | {rows[250][3]}
    result = ingest.apply(args=[usage_page(rows).encode()]).get()
    assert (result["inserted"], result["dead_letters"]) == (996, 4)
    assert set(sqlite_keys(remote)) == {r[3] for r in rows} - refused
    assert_within_d1_limits(migrated)

    wait_dead_letters(env, 4)
    dead = (
        "SELECT count(*) FROM failed_ingestions"
        " WHERE sink = 'd1' AND error_class = 'RejectedBySink'"
    )
    assert pg_scalar(env.pg_url, dead) == 4
    # D1's own message, for each poison record.
    d1_message = (
        "SELECT count(*) FROM failed_ingestions WHERE error_message ="
        " 'metric_value must be non-negative: SQLITE_CONSTRAINT'"
    )
    assert pg_scalar(env.pg_url, d1_message) == 3
    big = pg_scalar(
        env.pg_url,
        f"SELECT error_message FROM failed_ingestions WHERE record_key = '{rows[250][3]}'",
    )
    assert isinstance(big, str) and rows[250][3] in big and "100000 bytes" in big


# -- configuration ------------------------------------------------------------------------------


def test_config_needs_sinks_d1_when_a_stream_lists_it(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("[streams.usage_events]\nsinks = ['d1']\n")
    with pytest.raises(ConfigError, match=r"streams.usage_events.sinks: 'd1' needs a \[sinks.d1\]"):
        Settings.load({"SLUICE_CONFIG": str(path)})
    path.write_text(
        "[streams.usage_events]\nsinks = ['postgres', 'd1']\n\n"
        "[sinks.d1]\naccount_id = 'acc'\ndatabase_id = 'db'\napi_token = 'oops'\n"
    )
    with pytest.raises(ConfigError, match=r"sinks\.d1\.api_token: Extra inputs"):
        Settings.load({"SLUICE_CONFIG": str(path)})
    path.write_text(
        "[streams.usage_events]\nsinks = ['postgres', 'd1']\n\n"
        "[sinks.d1]\naccount_id = 'acc'\ndatabase_id = 'db'\n"
    )
    s = Settings.load({"SLUICE_CONFIG": str(path)})
    assert s.d1_sink is not None and s.d1_sink.api_token_env == "CLOUDFLARE_API_TOKEN"
    assert s.stream("usage_events").sinks == ("postgres", "d1")
    assert s.stream("timeseries").sinks == ("postgres", "sqlite")  # d1 only where asked
    assert "ingest.d1" in QUEUES


# -- end to end ---------------------------------------------------------------------------------


def test_end_to_end_d1_source_to_a_remote_d1_worker(
    env: Env, migrated: FakeD1, remote: Path
) -> None:
    """D1 source (usage_events) → Redis → a real `ingest.d1` worker process → the fake D1."""
    source_db = env.dir / "source-d1.sqlite"
    sample = write_d1_file(source_db, 6_000)
    source = f"""
[pipeline]
page_size = 500

[sources.d1_usage]
kind = "d1"
stream = "usage_events"
path = "{source_db}"
batch_size = 500
max_batches = 20
"""
    settings = configure(env, migrated, source)
    ctx = app.context
    assert settings.stream("usage_events").sinks == ("d1",)
    done = migrated.request_count  # fail_on counts every request the fake has had
    migrated.fail_on(done + 3, "rate_limit", retry_after=1)  # the workers meet a 429 and a 503
    migrated.fail_on(done + 5, "server_error", status=503)
    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("d1", ["ingest.d1"], 2)
        pool.start("rest", ["dead_letter", "progress"], 1)
        drain(ctx, "d1_usage", timeout=150)
        keys = sqlite_keys(remote)
        assert set(keys) == sample.distinct_valid_keys and max(keys.values()) == 1
        assert d1_processed(source_db) == (6_000, 6_000)
        inserted = "SELECT sum(inserted) FROM ingestion_runs WHERE sink = 'd1'"
        assert remote_scalar(remote, inserted) == len(sample.distinct_valid_keys)
        assert_within_d1_limits(migrated)
        assert migrated.faults.pending == 0  # both faults were met, and retried

        # `sluice status` shows the queue, and reads the stream's progress from the remote D1.
        doc = collect_status(ctx, app, timeout=1.0).as_dict()
        assert doc["errors"] == {}
        assert doc["queues"]["ingest.d1"]["total"] == 0
        assert doc["sources"]["d1_usage"]["last_commit"] is not None
        assert doc["sources"]["d1_usage"]["newest_record"] is not None
        collector = SluiceCollector(ctx)
        families = {f.name: f for f in collector.collect()}
        collector.engine.dispose()
        depth = families["sluice_queue_depth"].samples
        assert [s.value for s in depth if s.labels == {"queue": "ingest.d1"}] == [0.0]
        # Every part reads, the D1-backed source included (the local SQLite file, which the other
        # streams would use, does not exist in this test).
        up = {s.labels["part"]: s.value for s in families["sluice_collector_up"].samples}
        assert up.pop("sqlite") == 0 and set(up.values()) == {1}, up
        age = families["sluice_source_backlog_age_seconds"].samples
        assert [(s.labels["source"], s.value) for s in age] == [("d1_usage", 0.0)]

        # The same rows again, in a fresh source file: all duplicates, nothing written twice.
        write_d1_file(source_db, 6_000)
        drain(ctx, "d1_usage", timeout=150)
    assert remote_scalar(remote, inserted) == len(sample.distinct_valid_keys)
    assert max(sqlite_keys(remote).values()) == 1
    assert d1_processed(source_db) == (6_000, 6_000)
    dead = pg_scalar(env.pg_url, "SELECT count(DISTINCT record_key) FROM failed_ingestions")
    assert dead == sample.invalid  # the invalid source rows, and nothing else


def test_a_deletion_page_removes_keys_unless_a_later_read_wrote_them(
    migrated: FakeD1, remote: Path
) -> None:
    """A snapshot source's deletions: each key's row goes, unless the row was written from a
    read later than the deletion (its source order is higher); a redelivery changes nothing."""
    stream = USAGE_EVENTS.with_settings(sinks=("d1",), conflict="update")
    sink = make_sink(migrated)
    rows = [[*r, 100 + i] for i, r in enumerate(dedupe(stream, valid_rows(20))[:5])]
    sink.write(stream, rows, meta("w", len(rows)))
    keys = [[r[3], 150] for r in rows[:3]]  # read after rows 0-2 were written: they go
    keys.append([rows[3][3], 50])  # an older read than row 3's write: it stays
    deleted = sink.delete(stream, keys, meta("d", len(keys)))
    assert (deleted.deleted, deleted.duplicates) == (3, 1)
    assert remote_scalar(remote, "SELECT count(*) FROM usage_events") == 2
    assert sink.delete(stream, keys, meta("d", len(keys))).already_committed
    sink.close()

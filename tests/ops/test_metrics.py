"""`sluice serve`: /metrics from the databases, /health naming what is down, /status.

A real `sluice serve` process scraped over HTTP after a real run through worker processes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sluice.ops.metrics import registry_for
from sluice.ops.sample import write_d1_file
from sluice.ops.serve import health
from sluice.ops.workers import WorkerPool
from sluice.shared.celery_app import app
from sluice.shared.context import Context
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config, drain, pg_scalar

ROOT = Path(__file__).resolve().parents[2]
PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]


@contextmanager
def serving(env: dict[str, str]) -> Iterator[str]:
    """A `sluice serve --port 0` process; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.ops.cli", "serve", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "sluice serve: http://127.0.0.1:PORT (...)"
        assert line.startswith("sluice serve: http://"), (line, proc.stderr and proc.stderr.read())
        yield line.split()[2]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    code, body = get(base + "/metrics")
    assert code == 200, body
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def configure(env: Env) -> Context:
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    return ctx


def sqlite_scalar(path: Path, sql: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def test_metrics_show_the_counts_of_a_finished_run(env: Env, workers: WorkerPool) -> None:
    d1 = env.dir / "d1.sqlite"
    data = write_d1_file(d1, 4_000)
    env.write_config(d1_config(d1, page_size=500))
    ctx = configure(env)
    workers.start("pg", PG_QUEUES, 2)
    workers.start_sqlite_writer()
    drain(ctx, "d1_usage")

    with serving(env.vars) as base:
        m = scrape(base)
        assert all(v == 1 for (name, _), v in m.items() if name == "sluice_collector_up")
        stream = "usage_events"
        for sink, inserted, duplicates, pages in (
            (
                "postgres",
                pg_scalar(env.pg_url, "SELECT sum(inserted) FROM ingestion_runs"),
                pg_scalar(env.pg_url, "SELECT sum(duplicates) FROM ingestion_runs"),
                pg_scalar(env.pg_url, "SELECT count(*) FROM ingestion_runs"),
            ),
            (
                "sqlite",
                sqlite_scalar(env.sqlite_path, "SELECT sum(inserted) FROM ingestion_runs"),
                sqlite_scalar(env.sqlite_path, "SELECT sum(duplicates) FROM ingestion_runs"),
                sqlite_scalar(env.sqlite_path, "SELECT count(*) FROM ingestion_runs"),
            ),
        ):
            assert inserted == len(data.distinct_valid_keys)
            labels = {"stream": stream, "sink": sink}
            assert sample(m, "sluice_records_inserted_total", **labels) == inserted
            assert sample(m, "sluice_records_duplicates_total", **labels) == duplicates
            assert sample(m, "sluice_records_received_total", **labels) == 4_000
            assert sample(m, "sluice_records_invalid_total", **labels) == data.invalid
            dead = pg_scalar(
                env.pg_url, f"SELECT sum(attempts) FROM failed_ingestions WHERE sink = '{sink}'"
            )
            assert sample(m, "sluice_records_dead_lettered_total", **labels) == dead == data.invalid
            # The latency histogram: one observation per page, cumulative buckets.
            assert sample(m, "sluice_page_seconds_count", **labels) == pages
            assert sample(m, "sluice_page_seconds_bucket", **labels, le="+Inf") == pages
            buckets = sorted(
                (float(dict(lab)["le"]), v)
                for (name, lab), v in m.items()
                if name == "sluice_page_seconds_bucket" and dict(lab)["sink"] == sink
            )
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)
            assert sample(m, "sluice_page_seconds_sum", **labels) > 0
        pending = sum(v for (name, _), v in m.items() if name == "sluice_dead_letters_pending")
        assert pending == 2 * data.invalid
        for q in ("ingest.postgres", "ingest.sqlite", "dead_letter", "progress", "produce"):
            assert sample(m, "sluice_queue_depth", queue=q) == 0
        assert sample(m, "sluice_source_unprocessed_rows", source="d1_usage") == 0
        assert sample(m, "sluice_source_pages_in_flight", source="d1_usage") == 0
        assert sample(m, "sluice_source_backlog_age_seconds", source="d1_usage") == 0
        assert not any(name == "sluice_source_lag_seconds" for name, _ in m)
        assert sample(m, "sluice_source_runs_total", source="d1_usage", status="ok") >= 2

        # Derived from the databases: stopping the workers changes nothing, and a second
        # scrape counts nothing twice.
        workers.stop()
        again = scrape(base)
        for key, value in m.items():
            if key[0].endswith("_total") or key[0].startswith("sluice_page_seconds"):
                assert again[key] == value, key

        code, body = get(base + "/health")
        assert code == 200, body
        doc = json.loads(body)
        assert doc["status"] == "ok"
        assert set(doc["checks"]) == {"broker", "postgres", "sqlite"}

        code, body = get(base + "/status")
        assert code == 200, body
        status = json.loads(body)
        assert status["queues"]["ingest.postgres"]["total"] == 0
        assert status["dead_letters"]["pending"] == 2 * data.invalid
        assert status["sources"]["d1_usage"]["last_run"]["status"] == "ok"


def observed(m: Samples, sink: str) -> dict[str, float]:
    """The ingest delay histogram of usage_events in `sink`: cumulative count per bound."""
    out = {
        dict(labels)["le"]: v
        for (name, labels), v in m.items()
        if name == "sluice_ingest_delay_seconds_bucket"
        and dict(labels)["sink"] == sink
        and dict(labels)["stream"] == "usage_events"
    }
    out["count"] = sample(m, "sluice_ingest_delay_seconds_count", stream="usage_events", sink=sink)
    out["sum"] = sample(m, "sluice_ingest_delay_seconds_sum", stream="usage_events", sink=sink)
    return out


def test_backlog_age_and_ingest_delay_read_true_values(env: Env, workers: WorkerPool) -> None:
    """Rows written just now and ingested at once: no backlog, and delays of seconds. A row that
    waits unprocessed: the backlog's age is its age, and its delay is counted when it lands."""
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 1_000)
    lite = sqlite3.connect(d1)
    with lite:  # every well-formed event time becomes "now", as for events arriving live
        lite.execute(
            "UPDATE usage_events SET timestamp = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
            " WHERE timestamp GLOB '[0-9][0-9][0-9][0-9]-*'"
        )
    env.write_config(d1_config(d1, page_size=250))
    ctx = configure(env)
    workers.start("pg", PG_QUEUES, 2)
    workers.start_sqlite_writer()
    drain(ctx, "d1_usage")

    # The collector `sluice serve` registers, scraped in this process.
    registry = registry_for(ctx)

    def scrape_here() -> Samples:
        out: Samples = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    m = scrape_here()
    assert sample(m, "sluice_collector_up", part="ingest_delay") == 1
    assert sample(m, "sluice_source_backlog_age_seconds", source="d1_usage") == 0
    for sink in ("postgres", "sqlite"):
        h = observed(m, sink)
        # One observation per record written: at least every new key, at most every valid
        # record received (repeats of a key within a page are written once).
        totals = "SELECT sum(inserted) || ' ' || sum(received - invalid) FROM ingestion_runs"
        found = (
            pg_scalar(env.pg_url, f"{totals} WHERE sink = 'postgres'")
            if sink == "postgres"
            else sqlite_scalar(env.sqlite_path, totals)
        )
        inserted, valid = map(float, str(found).split())
        assert 0 < inserted <= h["count"] <= valid
        assert h["1.0"] <= h["60.0"] == h["count"]  # every record landed within a minute
        assert h["+Inf"] == h["count"] and 0 <= h["sum"] / h["count"] < 60

    # A row that arrived two hours ago and was never processed.
    two_hours_ago = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours')"
    with lite:
        lite.execute(
            "INSERT INTO usage_events (id, organisation_id, idempotency_key, metric_name,"
            " metric_value, timestamp)"
            f" VALUES ('late', 'org', 'late-1', 'm', 1, {two_hours_ago})"
        )
    m = scrape_here()
    age = sample(m, "sluice_source_backlog_age_seconds", source="d1_usage")
    assert 7200 <= age < 7200 + 60
    before = {sink: observed(m, sink) for sink in ("postgres", "sqlite")}

    drain(ctx, "d1_usage")
    m = scrape_here()
    assert sample(m, "sluice_source_backlog_age_seconds", source="d1_usage") == 0
    for sink in ("postgres", "sqlite"):
        h, was = observed(m, sink), before[sink]
        assert h["count"] == was["count"] + 1
        assert h["3600.0"] == was["3600.0"] and h["21600.0"] == was["21600.0"] + 1
        assert 7200 <= h["sum"] - was["sum"] < 7200 + 120
    lite.close()


def test_health_names_a_stopped_postgres(env: Env) -> None:
    migrate_sqlite(env.sqlite_path)
    down = dict(env.vars, SLUICE_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/x")
    with serving(down) as base:
        code, body = get(base + "/health")
        assert code == 503, body
        doc = json.loads(body)
        assert doc["status"] == "failing"
        assert doc["failing"] == ["postgres"]
        assert "postgres" in body
        assert doc["checks"]["broker"]["ok"] and doc["checks"]["sqlite"]["ok"]
        assert not doc["checks"]["postgres"]["ok"]
        # /metrics still answers with what it can read, and says what it could not.
        m = scrape(base)
        assert sample(m, "sluice_collector_up", part="postgres") == 0
        assert sample(m, "sluice_collector_up", part="broker") == 1
        assert sample(m, "sluice_queue_depth", queue="ingest.postgres") == 0
        assert not any(name == "sluice_records_inserted_total" for name, _ in m)
        code, body = get(base + "/status")
        assert code == 200 and "postgres" in json.loads(body)["errors"]


def test_health_names_a_missing_sqlite_file(env: Env) -> None:
    ctx = Context(Settings.load(dict(env.vars, SLUICE_SQLITE_PATH=str(env.dir / "gone.sqlite"))))
    try:
        code, doc = health(ctx)
    finally:
        ctx.close()
    assert code == 503
    assert doc["failing"] == ["sqlite"]
    assert not (env.dir / "gone.sqlite").exists()  # the check never creates the file

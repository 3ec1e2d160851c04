"""`sluice bench` as users run it, on a small data set: every figure the issue names is there,
consistent with the others, and the pipeline run it timed was exact (the bench checks the sink
and the D1 marks itself and fails otherwise). No speed is asserted: figures depend on the
machine."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import psycopg2

from sluice.shared.database import libpq_dsn
from sluice.shared.embedded import ensure_postgres, stop_services
from tests.ops.test_cli import sluice


def _sql(data_dir: Path, *statements: str) -> list[list[tuple[object, ...]]]:
    """Run statements on the bench's own PostgreSQL (started if need be); the rows of each."""
    conn = psycopg2.connect(libpq_dsn(ensure_postgres(data_dir)))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            out = []
            for sql in statements:
                cur.execute(sql)
                out.append(cur.fetchall() if cur.description else [])
            return out
    finally:
        conn.close()


def test_bench_reports_every_figure_for_both_sinks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    data_dir = tmp_path / "bench"
    try:
        run = sluice(
            "bench", "--sink", "postgres", "--sink", "sqlite", "--records", "3000",
            "--page-size", "500", "--runs", "1", "--naive-records", "200", "--json",
            "--data-dir", str(data_dir), "--keep-services",
            env=env, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        # dlt's dataset (a copy of the records) is dropped after it was timed.
        (schemas,) = _sql(data_dir, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'dlt%'")
        assert schemas == []
    finally:
        stop_services(data_dir)
    doc = json.loads(run.stdout)
    have_dlt = importlib.util.find_spec("dlt") is not None
    for sink in ("postgres", "sqlite"):
        r = doc[sink]
        assert r["sink"] == sink and r["records"] == 3000 and r["runs"] == 1
        assert r["limit_rps"] > 0 and r["pipeline_rps"] > 0
        assert abs(r["ratio_to_limit"] - r["pipeline_rps"] / r["limit_rps"]) < 0.01
        assert r["p99_page_ms"] > 0
        # Real worker processes were measured (a Python process with Celery loaded).
        assert 30 < r["worker_peak_rss_mb"] < 2000, r["rss_by_worker_mb"]
        assert r["worker_peak_rss_mb"] == max(r["rss_by_worker_mb"].values())
    pg, lite = doc["postgres"], doc["sqlite"]
    assert pg["naive_rps"] > 0
    assert abs(pg["speedup_vs_naive"] - pg["pipeline_rps"] / pg["naive_rps"]) < 0.2
    if have_dlt:
        assert pg["dlt_rps"] > 0 and pg["speedup_vs_dlt"] > 0
    else:
        assert pg["dlt_rps"] is None and any("dlt not installed" in n for n in pg["notes"])
    assert lite["naive_rps"] is None and lite["dlt_rps"] is None
    assert set(lite["rss_by_worker_mb"]) == {"writer", "aux0"}


def test_bench_prefills_only_its_own_table(tmp_path: Path) -> None:
    """--prefill drops and rebuilds the indexes of the sink's `usage_events`; another schema's
    table of that name (a dlt dataset, say) is neither touched nor in the way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    data_dir = tmp_path / "bench"
    try:
        _sql(
            data_dir,
            "CREATE SCHEMA other",
            "CREATE TABLE other.usage_events (id text PRIMARY KEY, k text)",
            "CREATE UNIQUE INDEX usage_events__other_k ON other.usage_events (k)",
        )
        run = sluice(
            "bench", "--sink", "postgres", "--records", "2000", "--page-size", "500",
            "--runs", "1", "--prefill", "5000", "--json", "--data-dir", str(data_dir),
            "--keep-services",
            env=env, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        r = json.loads(run.stdout)  # one sink: the object itself
        assert r["pipeline_rps"] > 0 and r["limit_rps"] > 0
        assert r["naive_rps"] is None and r["dlt_rps"] is None
        assert any("5,000 rows in the table" in n for n in r["notes"])
        other, prefilled = _sql(
            data_dir,
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'other'"
            " AND tablename = 'usage_events'",
            # The pipeline's rows went in beside the prefilled ones, which stayed.
            "SELECT count(*) FROM public.usage_events WHERE idempotency_key LIKE 'pre_%'",
        )
        assert other == [(2,)] and prefilled == [(5000,)]
    finally:
        stop_services(data_dir)

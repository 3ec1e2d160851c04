"""`sluice bench` as users run it, on a small data set: every figure the issue names is there,
consistent with the others, and the pipeline run it timed was exact (the bench checks the sink
and the D1 marks itself and fails otherwise). No speed is asserted: figures depend on the
machine."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from tests.test_cli import sluice


def test_bench_reports_every_figure_for_both_sinks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    run = sluice(
        "bench", "--sink", "postgres", "--sink", "sqlite", "--records", "3000",
        "--page-size", "500", "--runs", "1", "--naive-records", "200", "--json",
        "--data-dir", str(tmp_path / "bench"),
        env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
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

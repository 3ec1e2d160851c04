"""`sluice bench console` at a small size: it fills both stores through the same paths it uses
at a million rows and reports every figure, on rows the console's queries really return."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg2

from sluice.shared.database import libpq_dsn
from tests.ops.test_cli import sluice


def test_console_bench_reports_every_figure_on_both_stores(tmp_path: Path, pg_server: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    database = f"sluice_console_bench_t{os.getpid()}"
    r = sluice(
        "bench", "console", "--letters", "3000", "--runs", "2000", "--queries", "35",
        "--postgres-server", pg_server, "--database", database,
        "--data-dir", str(tmp_path), "--json",
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"postgres", "sqlite"}
    for store, result in doc.items():
        assert (result["letters"], result["runs"]) == (3000, 2000), store
        got = {t["name"]: t["rows"] for t in result["letter_queries"]}
        assert got["first page"] == got["deep keyset page (90% down)"] == 50, store
        assert got["page by text (one key)"] == 1, store
        assert 2500 < got["count pending"] < 2900, store  # about 90% are pending
        assert got["groups of pending"] == 7, store
        assert all(t["ms"] > 0 for t in result["letter_queries"]), store
        assert result["history_queries"] == 35, store
        assert 0 < result["history_p50_ms"] <= result["history_p95_ms"], store
        assert set(result["history_by_kind"]) >= {"first page", "by source", "deep page"}, store
    assert (tmp_path / "console-bench.sqlite").exists()
    admin = psycopg2.connect(libpq_dsn(pg_server))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    admin.close()

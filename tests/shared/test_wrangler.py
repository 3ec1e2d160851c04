"""The real `wrangler` (Cloudflare's CLI, local D1 through miniflare) against our SQL and layout.

`.ci/run` installs wrangler 3 with npm into `.tools/` when Node.js is on the machine; a developer
without Node gets these tests skipped with the reason printed (`pytest -rs`). `SLUICE_WRANGLER`
names another wrangler binary.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from sluice.producers.registry import open_source
from sluice.shared.settings import Settings
from sluice.shared.wrangler import d1_path
from tests.conftest import Env
from tests.ops.test_cli import ROOT

DB_ID = "00000000-0000-0000-0000-0000000000d1"


def _find_wrangler() -> str | None:
    for candidate in (
        os.environ.get("SLUICE_WRANGLER"),
        str(ROOT / ".tools" / "node_modules" / ".bin" / "wrangler"),
        shutil.which("wrangler"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


WRANGLER = _find_wrangler()
pytestmark = pytest.mark.skipif(
    WRANGLER is None,
    reason="wrangler not installed (needs Node.js; `.ci/run` installs it into .tools/)",
)


class Wrangler:
    """A throwaway wrangler project whose local D1 state lives in `dir/.wrangler/state`."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        (dir / "wrangler.toml").write_text(
            'name = "sluice-test"\ncompatibility_date = "2024-01-01"\n\n[[d1_databases]]\n'
            f'binding = "DB"\ndatabase_name = "sluice"\ndatabase_id = "{DB_ID}"\n'
        )
        # No telemetry, no prompts, no writes to the real home folder.
        self.env = {
            **os.environ,
            "HOME": str(dir),
            "XDG_CONFIG_HOME": str(dir / ".config"),
            "WRANGLER_SEND_METRICS": "false",
            "CI": "1",
        }

    @property
    def state(self) -> Path:
        return self.dir / ".wrangler" / "state"

    def execute(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert WRANGLER is not None
        r = subprocess.run(
            [WRANGLER, "d1", "execute", "sluice", "--local", *args],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, f"wrangler {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r


def test_every_sqlite_schema_file_applies_unchanged_with_wrangler_twice(tmp_path: Path) -> None:
    w = Wrangler(tmp_path / "wr")
    files = sorted((ROOT / "schema" / "sqlite").glob("*.sql"))
    assert files
    for round_ in range(2):  # idempotent: applying again is harmless
        for f in files:
            # A file that alters tables says it applies once (recorded by the migration tools).
            if round_ == 0 or "-- sluice: applies once" not in f.read_text():
                w.execute("--file", str(f))
    # wrangler wrote where our D1 source looks for it, and the tables are all there.
    path = d1_path(w.state, DB_ID)
    assert path.is_file(), sorted(str(p) for p in w.state.rglob("*.sqlite"))
    conn = sqlite3.connect(path)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    expected = {
        "usage_events",
        "failed_ingestions",
        "ingestion_runs",
        "historical_prices",
        "timeseries",
        "latest_prices",
        "data_coverage",
        "ingestion_performance",
        "users",
        "watchlists",
        "executions",
        "active_positions",
        "cache",
        "scheduled_job_results",
        "source_migrations",
        "source_migration_pages",
        "source_snapshots",
    }
    assert expected <= names, expected - names


def test_d1_source_reads_a_database_wrangler_made(env: Env) -> None:
    w = Wrangler(env.dir / "wr")
    w.execute("--file", str(ROOT / "schema" / "d1_source" / "usage_events.sql"))
    values = ", ".join(
        f"('e{i}', 'org1', NULL, 'k{i % 7}', 'api_calls', {i}.5, 'count',"
        f" '2024-05-01T00:00:{i:02d}Z', '{{\"n\": {i}}}', NULL)"
        for i in range(20)
    )
    w.execute(
        "--command",
        "INSERT INTO usage_events (id, organisation_id, project_id, idempotency_key, metric_name,"
        f' metric_value, unit, "timestamp", metadata, processed_at) VALUES {values}',
    )
    env.write_config(
        f"""
[sources.w]
kind = "d1"
stream = "usage_events"
wrangler_state = "{w.state}"
database_id = "{DB_ID}"
batch_size = 8
"""
    )
    source = open_source(Settings.load(env.vars), "w")
    try:
        pages = list(source.pages(None, 10))
        assert [len(p.rows) for p in pages] == [8, 8, 4]
        rows = [r for p in pages for r in p.rows]
        assert sorted(r[0] for r in rows) == sorted(f"e{i}" for i in range(20))
        source.acknowledge(pages[0].ack)
    finally:
        source.close()
    # wrangler itself sees our acknowledgement: the first page's rows are marked processed.
    r = w.execute(
        "--command", "SELECT count(*) AS n FROM usage_events WHERE processed_at IS NOT NULL"
    )
    assert '"n": 8' in r.stdout, r.stdout

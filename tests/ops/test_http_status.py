"""Status, metrics and `config check` list every kind of source: a D1 source and an HTTP API
source side by side; the HTTP source's lag comes from its cursors (source_progress)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import generate_latest

from sluice.ops.metrics import registry_for
from sluice.ops.sample import write_d1_file
from sluice.ops.status import collect_sources
from sluice.ops.status_report import SourceReport
from sluice.producers.cursors import CursorStore
from sluice.producers.http_source import floor_time
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.database import postgres_engine
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import StateStore
from tests.conftest import Env
from tests.fakes.market_server import FakeMarket
from tests.helpers import d1_config
from tests.ops.test_cli import sluice


def binance(base_url: str, start: datetime) -> str:
    return f"""
[sources.bn]
kind = "binance"
base_url = "{base_url}"
symbols = ["BTCUSDT", "ETHUSDT"]
interval = "1h"
limit = 24
start = "{start.isoformat()}"
schedule = {{ every = 300 }}
"""


def sources_doc(found: dict[str, SourceReport]) -> dict[str, dict[str, Any]]:
    """The sources as `sluice status --json` shows them."""
    return {name: s.as_dict() for name, s in found.items()}


def test_status_metrics_and_config_check_show_http_sources(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 100)
    start = floor_time(datetime.now(UTC) - timedelta(hours=5), timedelta(hours=1))
    with FakeMarket() as fake:
        env.write_config(d1_config(d1) + binance(fake.base_url, start))
        settings = Settings.load(env.vars)
        ctx = app.configure(settings)
        migrate_sqlite(env.sqlite_path)  # the SQLite sink's file, which status reads
        assert set(settings.sources) == {"d1_usage", "bn"}

        check = sluice("config", "check", env=env.vars, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "2 source(s)" in check.stdout
        assert "source bn: binance → historical_prices (schedule: {'every': 300" in check.stdout
        assert "source d1_usage: d1 local, mark → usage_events" in check.stdout

        engine = postgres_engine(env.pg_url)
        try:
            errors: dict[str, str] = {}
            before = sources_doc(collect_sources(ctx, engine, StateStore(engine), errors))
            assert errors == {}
            assert before["bn"]["kind"] == "binance"
            assert before["bn"]["lag_seconds"] is None and before["bn"]["cursors"] == {}
            assert before["bn"]["last_run"] is None
            assert "unprocessed" not in before["bn"] and "mode" not in before["bn"]
            assert before["d1_usage"]["unprocessed"] == 100

            assert run_source(ctx, "bn").pages == 2  # one window per symbol, not yet committed
            behind = datetime.now(UTC) - timedelta(hours=3)
            cursors = CursorStore(StateStore(engine))
            cursors.set("bn", "BTCUSDT", behind)
            cursors.set("bn", "ETHUSDT", behind + timedelta(hours=2))

            after = sources_doc(collect_sources(ctx, engine, StateStore(engine), errors))
            assert errors == {}
            bn = after["bn"]
            assert bn["pages_in_flight"] == 2
            assert bn["last_run"]["status"] == "ok" and bn["last_run"]["pages"] == 2
            assert 3 * 3600 - 5 <= bn["lag_seconds"] <= 3 * 3600 + 60  # the furthest behind
            assert set(bn["cursors"]) == {"BTCUSDT", "ETHUSDT"}

            text = generate_latest(registry_for(ctx, engine)).decode()
            # The backlog of an HTTP source starts at its cursor furthest behind.
            age = [
                line
                for line in text.splitlines()
                if line.startswith('sluice_source_backlog_age_seconds{source="bn"}')
            ]
            assert len(age) == 1 and 3 * 3600 - 5 <= float(age[0].split()[-1]) <= 3 * 3600 + 60
            assert 3 * 3600 - 5 <= bn["backlog_age_seconds"] <= 3 * 3600 + 60
            assert 'sluice_source_pages_in_flight{source="bn"} 2.0' in text
            assert 'sluice_source_unprocessed_rows{source="d1_usage"} 100.0' in text
            assert 'sluice_source_unprocessed_rows{source="bn"}' not in text

            shown = sluice("status", env=env.vars, timeout=60)
            assert shown.returncode == 1, shown.stderr  # pages wait, and no worker runs
            assert "no worker consumes ingest.postgres (2 pages waiting)" in shown.stdout
            assert "sources (2)" in shown.stdout
            assert any(line.strip().startswith("bn ") for line in shown.stdout.splitlines())
        finally:
            engine.dispose()

"""The alert rules and the Grafana dashboard in ops/monitoring/: valid for promtool, each alert
fired by the series that should fire it and not by the ones that should not, and every metric
they name one that a real `sluice serve` exports after a real run."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sluice.ops.d1_size import d1_database_sizes
from sluice.ops.sample import write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config, drain
from tests.ops import test_metrics as served

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "monitoring" / "prometheus" / "sluice-rules.yml"
RULES_TEST = ROOT / "tests" / "monitoring" / "rules_test.yml"
DASHBOARD = ROOT / "ops" / "monitoring" / "grafana" / "sluice-dashboard.json"
GUIDE = ROOT / "ops" / "README.md"

METRIC = re.compile(r"\b(sluice_[a-z0-9_]+)\b")


def promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: install Debian's `prometheus` package (.ci/run does)")
    return subprocess.run(
        [exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_promtool_accepts_the_rules() -> None:
    r = promtool("check", "rules", RULES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_each_alert_fires_on_its_series_and_not_on_the_others() -> None:
    r = promtool("test", "rules", RULES_TEST.relative_to(ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    # Every alert is tested both ways: a case that expects it and one that expects silence.
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert [str((RULES_TEST.parent / f).resolve()) for f in doc["rule_files"]] == [str(RULES)]
    fired: set[str] = set()
    silent: set[str] = set()
    for group in doc["tests"]:
        for case in group["alert_rule_test"]:
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names == fired, f"never expected to fire: {names - fired}"
    assert names == silent, f"never expected to stay silent: {names - silent}"


def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rules file with one threshold moved fails them."""
    (tmp_path / "ops/monitoring/prometheus").mkdir(parents=True)
    (tmp_path / "tests/monitoring").mkdir(parents=True)
    broken = RULES.read_text().replace('sluice_queue_depth{queue=~"ingest\\\\..+"} > 5000', "x")
    assert broken != RULES.read_text()
    broken = broken.replace("x\n", 'sluice_queue_depth{queue=~"ingest\\\\..+"} > 8000\n', 1)
    (tmp_path / RULES.relative_to(ROOT)).write_text(broken)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.relative_to(ROOT))
    r = promtool("test", "rules", RULES_TEST.relative_to(ROOT), cwd=tmp_path)
    assert r.returncode != 0
    assert "SluiceQueueBacklogGrowing" in r.stdout + r.stderr


def test_each_alert_says_how_long_how_bad_and_what_to_do() -> None:
    guide = GUIDE.read_text()
    section = guide.split("## Alerts and dashboards", 1)[1].split("\n## ", 1)[0]
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 80, name
        assert "ops/README.md, Alerts and dashboards" in notes["description"], name
        assert f"`{name}`" in section, f"{name} is not explained in the operator's guide"


def test_the_dashboard_has_grafana_shape() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in doc["panels"]:
        assert p["type"] in {"timeseries", "stat"} and p["title"], p["id"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        # Panels do not overlap (grid cells of one unit).
        own = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & own, f"{p['title']} overlaps another panel"
        cells |= own
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["datasource"] == p["datasource"], p["title"]
    # What an operator looks for first, each on a panel.
    shown = " ".join(dashboard_exprs())
    for metric in (
        "sluice_records_inserted_total",
        "sluice_queue_depth",
        "sluice_dead_letters_pending",
        "sluice_source_backlog_age_seconds",
        "sluice_ingest_delay_seconds_bucket",
        "sluice_source_runs_total",
        "sluice_d1_database_size_bytes",
    ):
        assert metric in shown, metric


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule), Grafana's interval variables filled in."""
    rules = [
        {"record": f"sluice:dashboard_query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", path)
    assert r.returncode == 0, r.stdout + r.stderr


def exported_names(body: str) -> set[str]:
    """Every series name the exposition declares, whether or not it has a sample yet."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}
    for family in text_string_to_metric_families(body):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def test_every_metric_the_rules_and_dashboard_name_is_exported(
    env: Env, workers: WorkerPool
) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 1_000)
    env.write_config(d1_config(d1, page_size=500))
    ctx = served.configure(env)
    workers.start("pg", served.PG_QUEUES, 2)
    workers.start_sqlite_writer()
    drain(ctx, "d1_usage")
    with served.serving(env.vars) as base:
        code, body = served.get(base.rstrip("/") + "/metrics")
    assert code == 200, body
    exported = exported_names(body)
    named = set(METRIC.findall(RULES.read_text())) | {
        m for e in dashboard_exprs() for m in METRIC.findall(e)
    }
    assert named, "no metric found in the rules or the dashboard"
    missing = sorted(named - exported)
    assert not missing, f"named but not exported by /metrics: {missing}"


def test_d1_size_is_the_database_size(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 2_000)
    env.write_config(
        d1_config(d1) + '\n[sources.gone]\nkind = "d1"\nstream = "usage_events"\n'
        f'path = "{env.dir / "missing.sqlite"}"\n'
    )
    errors: dict[str, str] = {}
    sizes = d1_database_sizes(Settings.load(env.vars), errors)
    assert sizes == {"d1_usage": d1.stat().st_size}
    assert d1.stat().st_size > 100_000
    assert list(errors) == ["d1_size:gone"]
    # Rows added while another connection holds the file: the size follows them.
    conn = sqlite3.connect(d1)
    conn.execute("CREATE TABLE filler (b BLOB)")
    conn.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 4096,)] * 100)
    conn.commit()
    conn.close()
    grown = d1_database_sizes(Settings.load(env.vars), {})["d1_usage"]
    assert grown == d1.stat().st_size >= sizes["d1_usage"] + 100 * 4096

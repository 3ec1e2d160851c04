"""`sluice scale` resizes running workers' pools through Celery remote control."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from sluice.ops.status import pool_size
from sluice.ops.workers import WorkerPool
from sluice.shared.celery_app import app
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.ops.test_cli import sluice

HOST = socket.gethostname()
FIXED, AUTO = f"fixed@{HOST}", f"auto@{HOST}"


def stats(nodes: list[str]) -> dict[str, Any]:
    inspect = app.control.inspect(timeout=1, destination=nodes, limit=len(nodes))
    result: dict[str, Any] = inspect.stats() or {}
    return result


def wait_online(nodes: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while set(stats(nodes)) != set(nodes):
        assert time.monotonic() < deadline, f"workers {nodes} never answered"


def scale(env: Env, *args: str) -> tuple[int, list[dict[str, Any]]]:
    r = sluice("scale", *args, "--json", env=env.vars, timeout=120)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def test_scale_changes_a_running_workers_pool(env: Env, workers: WorkerPool) -> None:
    app.configure(Settings.load(env.vars))
    workers.start("fixed", ["produce"], 1)
    workers.start("auto", ["progress"], 1, extra=["--autoscale", "3,1"])
    wait_online([FIXED, AUTO])

    # --set on one node: it grows from 1 to 3 processes; the other node is untouched.
    code, out = scale(env, "--node", FIXED, "--set", "3")
    assert code == 0, out
    assert [(r["node"], r["action"], r["before"], r["after"]) for r in out] == [
        (FIXED, "grow 2", 1, 3)
    ]
    st = stats([FIXED, AUTO])
    assert pool_size(st[FIXED]) == 3 and len(st[FIXED]["pool"]["processes"]) == 3
    assert st[AUTO]["autoscaler"]["max"] == 3

    # Every node: the fixed one grows; the autoscaled one refuses, and says what to do instead.
    code, out = scale(env, "--grow", "1")
    assert code == 1
    by_node = {r["node"]: r for r in out}
    assert by_node[FIXED]["ok"] and by_node[FIXED]["after"] == 4
    assert not by_node[AUTO]["ok"]
    assert "autoscale" in by_node[AUTO]["error"] and "--autoscale MAX,MIN" in by_node[AUTO]["error"]

    # Autoscale: changes the range of the autoscaled node; the fixed one cannot be switched.
    code, out = scale(env, "--autoscale", "4,2")
    assert code == 1
    by_node = {r["node"]: r for r in out}
    assert by_node[AUTO]["ok"] and by_node[AUTO]["autoscale"] == {"max": 4, "min": 2}
    assert "not enabled" in by_node[FIXED]["error"]
    assert stats([AUTO])[AUTO]["autoscaler"]["min"] == 2

    # Back to one process.
    code, out = scale(env, "--node", FIXED, "--set", "1")
    assert code == 0, out
    assert (out[0]["action"], out[0]["before"], out[0]["after"]) == ("shrink 3", 4, 1)
    assert pool_size(stats([FIXED])[FIXED]) == 1

    # Text output and an unknown node.
    r = sluice("scale", "--node", f"nobody@{HOST}", "--grow", "1", env=env.vars, timeout=60)
    assert r.returncode == 2 and "no worker answered" in r.stderr

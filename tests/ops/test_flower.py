"""`sluice flower`: a real Flower process on our broker, with basic auth, against real workers.

The SQLite writer is held up by a write lock this test keeps on the sink file, so its queue
keeps a known backlog: Flower's queue length is the waiting part only (LLEN), while
`sluice status` also counts what the worker holds (unacked). A queue no online worker consumes
(ingest.postgres here) is not listed by Flower at all: Flower learns the queues from the
workers it finds.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.ops.sample import write_d1_file
from sluice.ops.status import queue_depths
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.database import sqlite_connect
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config
from tests.ops.test_cli import sluice

ROOT = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()
AUTH = "ops:s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, str(e)


@pytest.fixture
def flower(env: Env) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log = (env.dir / "flower.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluice.ops.cli",
            "flower",
            "--port",
            str(port),
            "--address",
            "127.0.0.1",
        ],
        env=dict(env.vars, SLUICE_FLOWER_AUTH=AUTH),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while get(base + "/healthcheck")[0] != 200:
            assert proc.poll() is None, (env.dir / "flower.log").read_text()
            assert time.monotonic() < deadline, "Flower did not start"
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def flower_queues(base: str) -> dict[str, int]:
    code, body = get(base + "/api/queues/length", auth=AUTH)
    assert code == 200, body
    return {q["name"]: q["messages"] for q in json.loads(body)["active_queues"]}


def test_flower_refuses_to_start_without_auth(env: Env) -> None:
    r = sluice("flower", "--port", str(free_port()), env=env.vars, timeout=60)
    assert r.returncode == 2
    assert "SLUICE_FLOWER_AUTH" in r.stderr and "--no-auth" in r.stderr


def test_flower_lists_our_queues_with_their_depth(
    env: Env, workers: WorkerPool, request: pytest.FixtureRequest
) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 3_000)
    config = d1_config(d1, page_size=500)
    # The SQLite writer waits for the lock instead of failing while this test holds it.
    env.write_config(
        config.replace("[pipeline]\n", "[pipeline]\nsqlite_busy_timeout_ms = 120000\n")
    )
    ctx = app.configure(Settings.load(env.vars))
    migrate_sqlite(env.sqlite_path)
    lock = sqlite_connect(env.sqlite_path)
    lock.execute("BEGIN IMMEDIATE")

    def release() -> None:
        lock.execute("ROLLBACK")
        lock.close()

    request.addfinalizer(release)  # before the workers stop, so the writer can finish

    workers.start("lite", ["ingest.sqlite"], 1)
    workers.start("ops", ["dead_letter", "progress", "produce"], 1)
    nodes = [f"lite@{HOST}", f"ops@{HOST}"]
    deadline = time.monotonic() + 60
    while len(app.control.inspect(timeout=1, destination=nodes, limit=2).stats() or {}) < 2:
        assert time.monotonic() < deadline, "workers did not come online"

    assert run_source(ctx, "d1_usage").pages == 6
    # The writer takes a page (blocked on the lock) and prefetches one more: 2 unacked, 4 waiting.
    deadline = time.monotonic() + 30
    while queue_depths(ctx.redis)["ingest.sqlite"]["unacked"] < 2:
        assert time.monotonic() < deadline, queue_depths(ctx.redis)
        time.sleep(0.1)

    flower_fixture: Any = request.getfixturevalue("flower")
    base, proc = flower_fixture
    assert get(base + "/api/queues/length")[0] == 401  # the API needs the password

    expected = {"ingest.sqlite", "dead_letter", "progress", "produce"}
    deadline = time.monotonic() + 30
    while set(seen := flower_queues(base)) != expected:
        # Flower learns the workers' queues by inspecting them at start; ask it again if a
        # reply came late.
        get(base + "/api/workers?refresh=1", auth=AUTH)
        assert time.monotonic() < deadline, seen
        time.sleep(0.5)

    depths = queue_depths(ctx.redis)
    assert depths["ingest.sqlite"] == {"waiting": 4, "unacked": 2, "total": 6}
    assert seen["ingest.sqlite"] == depths["ingest.sqlite"]["waiting"] == 4  # unacked not counted
    assert seen["dead_letter"] == seen["progress"] == seen["produce"] == 0
    # Nobody consumes ingest.postgres: Flower does not list it; `sluice status` does.
    assert "ingest.postgres" not in seen
    assert depths["ingest.postgres"]["waiting"] == 6

    # Neither the broker URL nor the password is visible in the process list.
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    assert env.redis_url not in cmdline and "s3cret" not in cmdline

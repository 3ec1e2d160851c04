"""The `sluice` command as users run it: real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sluice.ops.sample import generate_rows, write_d1_file
from sluice.shared.migrations import migrate_sqlite
from tests.conftest import Env
from tests.helpers import d1_config

ROOT = Path(__file__).resolve().parents[2]


def sluice(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.ops.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_with_embedded_servers_is_exact_and_idempotent(tmp_path: Path) -> None:
    """No URLs set: the demo starts the embedded Redis and PostgreSQL of its data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    data = tmp_path / "demo"
    _, valid, invalid = generate_rows(5_000)
    first = sluice("demo", "--records", "5000", "--json", "--data-dir", str(data), env=env)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["fetched"] == 5_000
    assert doc["inserted"] == len(valid)
    assert doc["dead_letters"] == invalid
    # Every valid record is counted once per sink: new, a duplicate, or (when an earlier read of
    # a key reached the sink after a later one, which parallel workers make a matter of timing)
    # an update that puts the earlier read back.
    for sink in ("postgres", "sqlite"):
        counts = doc["sinks"][sink]
        assert counts["inserted"] == len(valid)
        assert counts["duplicates"] + counts["updated"] == 5_000 - invalid - len(valid), sink
    assert doc["duplicates"] == 5_000 - invalid - len(valid)
    # Same rows, fresh D1 file, same sinks: nothing new.
    second = sluice("demo", "--records", "5000", "--json", "--data-dir", str(data), env=env)
    assert second.returncode == 0, second.stderr
    doc2 = json.loads(second.stdout)
    assert doc2["inserted"] == 0 and doc2["duplicates"] == 5_000 - invalid
    assert all(counts["updated"] == 0 for counts in doc2["sinks"].values())
    # A larger sample has other invalid rows: the count is this run's letters only, not every
    # letter still pending from the runs before.
    _, _, invalid3 = generate_rows(7_000)
    third = sluice("demo", "--records", "7000", "--json", "--data-dir", str(data), env=env)
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["dead_letters"] == invalid3 != invalid
    # The demo stopped the servers it started.
    status = sluice("services", "status", env=dict(env, SLUICE_DATA_DIR=str(data)))
    assert "not running" in status.stdout and "redis://" not in status.stdout


def test_produce_and_status_json(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 1_200)
    env.write_config(d1_config(d1, page_size=500, max_batches=2))
    migrate_sqlite(env.sqlite_path)
    run = sluice("produce", "d1_usage", "--json", env=env.vars)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["status"], summary["pages"], summary["records"]) == ("ok", 2, 1_000)
    status = sluice("status", "--json", env=env.vars)
    assert status.returncode == 1, status.stderr  # pages wait and no worker consumes them
    assert (
        "no worker consumes ingest.postgres (2 pages waiting)"
        in json.loads(status.stdout)["problems"]
    )
    queues = json.loads(status.stdout)["queues"]
    assert queues["ingest.postgres"] == {"waiting": 2, "unacked": 0, "total": 2}
    assert queues["ingest.sqlite"]["total"] == 2


def test_migrate_twice(env: Env) -> None:
    first = sluice("migrate", env=env.vars)
    assert first.returncode == 0, first.stderr
    assert "sqlite: applied 0001_core" in first.stdout
    assert "postgres: up to date" in first.stdout  # the test database is already migrated
    second = sluice("migrate", env=env.vars)
    assert "sqlite: up to date" in second.stdout


def test_unknown_source_is_a_clear_error(env: Env) -> None:
    env.write_config("")
    r = sluice("produce", "nope", env=env.vars)
    assert r.returncode == 2
    assert r.stderr.startswith("sluice: unknown source 'nope'")


def test_beat_runs_a_scheduled_source_through_workers(env: Env) -> None:
    import subprocess as sp
    import time

    from sluice.ops.workers import WorkerPool
    from tests.helpers import d1_processed, pg_scalar

    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 2_000)
    env.write_config(d1_config(d1, page_size=500) + "schedule = { every = 1 }\n")
    migrate_sqlite(env.sqlite_path)
    beat = sp.Popen(
        [sys.executable, "-m", "sluice.ops.cli", "beat", "--loglevel", "WARNING"],
        env=env.vars,
        cwd=ROOT,
        stdout=sp.DEVNULL,
        stderr=sp.DEVNULL,
    )
    try:
        with WorkerPool(env.vars, env.dir / "logs") as pool:
            pool.start(
                "all", ["ingest.postgres", "ingest.sqlite", "dead_letter", "progress", "produce"], 2
            )
            deadline = time.monotonic() + 90
            while d1_processed(d1) != (2_000, 2_000):
                assert time.monotonic() < deadline, "beat-driven runs did not drain the source"
                time.sleep(0.5)
    finally:
        beat.terminate()
        beat.wait(10)
    assert pg_scalar(env.pg_url, "SELECT count(*) FROM source_runs WHERE status = 'ok'") >= 1


ARENAS = """
import ctypes, sys, threading
from sluice.ops.workers import cap_malloc_arenas
if sys.argv[1] == "capped":
    assert cap_malloc_arenas(2)
def decode_pages():  # what a writer thread does: allocate and free objects of many sizes
    for _ in range(50):
        page = [bytes(1000 + i % 500) for i in range(2000)]
        del page
threads = [threading.Thread(target=decode_pages) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def test_threads_worker_caps_mallocs_arenas() -> None:
    """What `sluice worker --pool threads` does first: cap glibc's malloc arenas.
    16 threads then share 2; uncapped, each gets its own, and the SQLite writer's memory grew
    with the length of the run."""

    def arenas(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", ARENAS, mode], cwd=ROOT, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return sum(line.startswith("Arena ") for line in run.stderr.splitlines())

    assert arenas("capped") == 2
    assert arenas("default") > 2

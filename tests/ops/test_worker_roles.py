"""Workers are named by role (`postgres@host`, `sqlite@host`, …) unless told otherwise, and
`sluice scale` addresses a role: real `sluice worker` processes, a prefork PostgreSQL pool and
the threads-pool SQLite writer, started with no --hostname."""

from __future__ import annotations

import socket

from sluice.ops.status import pool_size
from sluice.ops.workers import WorkerPool, default_hostname, role_for_queues, role_of
from sluice.shared.celery_app import QUEUES, app
from sluice.shared.settings import Settings
from sluice.shared.sinks.sqlite import WRITER_THREADS
from tests.conftest import Env
from tests.ops.test_cli import sluice

# The same worker pool fixture and inspect helpers as the scale tests.
from tests.ops.test_scale import scale, stats, wait_online

HOST = socket.gethostname()
POSTGRES, SQLITE = f"postgres@{HOST}", f"sqlite@{HOST}"
PG_QUEUES = ["ingest.postgres", "dead_letter", "progress", "produce"]


def test_a_workers_role_comes_from_its_queues() -> None:
    assert role_for_queues(PG_QUEUES) == "postgres"
    assert role_for_queues(["ingest.sqlite"]) == "sqlite"
    assert role_for_queues([" ingest.d1 "]) == "d1"
    assert role_for_queues(QUEUES) == "sluice"  # every queue: a mixed worker
    assert role_for_queues(["ingest.postgres", "ingest.sqlite"]) == "sluice"
    assert role_for_queues(["dead_letter", "progress"]) == "sluice"
    assert default_hostname(["ingest.sqlite"]) == "sqlite@%h"
    assert role_of("postgres@db1") == "postgres"
    assert role_of("postgres-2@db1") == "postgres"  # a second one on the same host
    assert role_of("lite@db1") == "lite" and role_of("d1-writer@h") == "d1-writer"


def test_scale_by_role_grows_prefork_and_reports_a_threads_pool(
    env: Env, workers: WorkerPool
) -> None:
    app.configure(Settings.load(env.vars))
    # As the operator's guide starts them: no --hostname.
    workers.start("postgres", PG_QUEUES, 1, by_role=True)
    workers.start(
        "sqlite", ["ingest.sqlite"], WRITER_THREADS, extra=["--pool", "threads"], by_role=True
    )
    wait_online([POSTGRES, SQLITE])
    before = stats([POSTGRES, SQLITE])
    assert pool_size(before[POSTGRES]) == 1
    assert before[SQLITE]["pool"]["implementation"].endswith("thread:TaskPool")

    # The PostgreSQL role grows to 4 processes; the writer is left alone.
    code, out = scale(env, "--role", "postgres", "--set", "4")
    assert code == 0, out
    assert [(r["node"], r["action"], r["before"], r["after"], r["ok"]) for r in out] == [
        (POSTGRES, "grow 3", 1, 4, True)
    ]
    now = stats([POSTGRES, SQLITE])
    assert len(now[POSTGRES]["pool"]["processes"]) == 4
    assert now[SQLITE]["pool"]["max-concurrency"] == WRITER_THREADS

    # The threads pool cannot be resized: said so, for that node, and the command fails.
    code, out = scale(env, "--role", "sqlite", "--set", "4")
    assert code == 1, out
    assert [(r["node"], r["ok"]) for r in out] == [(SQLITE, False)]
    assert "cannot be resized" in out[0]["error"] and "thread" in out[0]["error"]
    assert stats([SQLITE])[SQLITE]["pool"]["max-concurrency"] == WRITER_THREADS

    # Every node: the prefork one shrinks, the writer is reported, the exit code is 1.
    r = sluice("scale", "--set", "2", env=env.vars, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "shrink 2" in lines[POSTGRES] and lines[POSTGRES].rstrip().endswith("pool will shrink")
    assert "cannot be resized" in lines[SQLITE]
    assert pool_size(stats([POSTGRES])[POSTGRES]) == 2

    # A role nobody plays is a usage error, named.
    r = sluice("scale", "--role", "d1", "--grow", "1", env=env.vars, timeout=60)
    assert r.returncode == 2 and "of role d1" in r.stderr

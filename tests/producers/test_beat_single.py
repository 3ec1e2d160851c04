"""Exactly one `sluice beat` dispatches however many run (celery-redbeat's Redis lock), and a
standby takes over when the active one dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.conftest import Env
from tests.ops.test_cli import ROOT

LOCK_TIMEOUT = 6
DUE = "Sending due task produce:bn"


def start_beat(env: Env, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluice.ops.cli",
            "beat",
            "--lock-timeout",
            str(LOCK_TIMEOUT),
            "--max-loop-interval",
            "1",
        ],
        env=env.vars,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def dispatching(log: Path) -> bool:
    return log.exists() and DUE in log.read_text(errors="replace")


def wait_for(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_two_beats_dispatch_once_and_the_standby_takes_over(env: Env) -> None:
    env.write_config(
        """
[sources.bn]
kind = "binance"
base_url = "http://127.0.0.1:9"
symbols = ["BTCUSDT"]
schedule = { every = 1 }
"""
    )
    r = redis.Redis.from_url(env.redis_url)
    logs = [env.dir / "beat-a.log", env.dir / "beat-b.log"]
    procs = [start_beat(env, logs[0]), start_beat(env, logs[1])]
    try:
        # No worker consumes `produce`: every dispatch stays in the queue, countable.
        assert wait_for(lambda: r.llen("produce") > 0, 30), [p.read_text() for p in logs]
        time.sleep(2)
        n0 = r.llen("produce")
        time.sleep(6)
        sent = r.llen("produce") - n0
        assert 4 <= sent <= 8, sent  # about one a second: two beats would send about 12
        active = [i for i, log in enumerate(logs) if dispatching(log)]
        assert len(active) == 1, [log.read_text() for log in logs]
        standby = 1 - active[0]
        assert r.exists("sluice:redbeat:lock")

        # The active beat dies without releasing the lock: the standby dispatches once it
        # expires (LOCK_TIMEOUT) and its next check (max loop interval) comes.
        procs[active[0]].send_signal(signal.SIGKILL)
        procs[active[0]].wait(10)
        t0 = time.monotonic()
        assert wait_for(lambda: dispatching(logs[standby]), LOCK_TIMEOUT + 10), logs[
            standby
        ].read_text()
        assert time.monotonic() - t0 <= LOCK_TIMEOUT + 10
        n1 = r.llen("produce")
        time.sleep(4)
        assert 2 <= r.llen("produce") - n1 <= 6
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        r.close()

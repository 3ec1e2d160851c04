"""Embedded Redis/PostgreSQL: real servers, real processes, one server per data folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
import sqlalchemy as sa

from sluice.shared.embedded import ensure_postgres, ensure_redis, service_status, stop_services

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/cwd").exists(), reason="process checks read /proc (Linux)"
)

ROOT = Path(__file__).resolve().parents[2]

# Children report "ready" then wait for "go", so their ensure_* calls really start together
# (interpreter start-up would otherwise stagger them by more than a server start takes).
_CHILD = """
import sys, time
from pathlib import Path
from sluice.shared import embedded
data_dir, barrier, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(barrier / f"ready-{name}").touch()
deadline = time.monotonic() + 60
while not (barrier / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.001)
print(getattr(embedded, sys.argv[4])(data_dir))
"""


def _live_pids(cwd_under: Path) -> dict[int, str]:
    """pid -> command name of non-zombie processes whose working directory is under cwd_under.

    redis-server chdirs to --dir and postgres (all its children too) to PGDATA, and neither keeps
    the data folder in its retitled command line, so the cwd is the reliable marker."""
    found: dict[int, str] = {}
    prefix = str(cwd_under.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if state not in {"Z", "X"} and (cwd == prefix or cwd.startswith(prefix + "/")):
            found[int(entry.name)] = comm
    return found


def _in_processes(data_dir: Path, func: str, n: int, barrier: Path) -> list[str]:
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(data_dir), str(barrier), str(i), func],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < n:
        assert time.monotonic() < deadline, "children did not get ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (barrier / "go").touch()
    urls = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        urls.append(out.strip())
    return urls


def _pid(path: Path) -> int:
    return int(path.read_text().splitlines()[0])


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in {"Z", "X"}:
            return
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"  # deliberately missing: ensure_* must create it
    yield path
    if path.exists():
        stop_services(path)
        leftovers = _live_pids(path)
        for pid in leftovers:  # never leave a server behind, even if the test broke things
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left running after stop_services: {leftovers}"


def test_redis_started_once_and_configured(data_dir: Path) -> None:
    t0 = time.monotonic()
    url = ensure_redis(data_dir)
    started_in = time.monotonic() - t0
    assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
    assert ensure_redis(data_dir) == url
    assert (data_dir / "redis" / "redis.port").is_file()

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        assert client.set("sluice:k", "v")
        assert client.get("sluice:k") == "v"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("dir") == {"dir": str((data_dir / "redis").resolve())}
    finally:
        client.close()
    assert service_status(data_dir) == {"redis": url, "postgres": None}
    print(f"redis cold start: {started_in:.3f}s")


def test_concurrent_ensure_redis_starts_one_server(data_dir: Path, tmp_path: Path) -> None:
    urls = _in_processes(data_dir, "ensure_redis", 3, tmp_path / "barrier")
    assert len(set(urls)) == 1, urls
    assert ensure_redis(data_dir) == urls[0]
    servers = _live_pids(data_dir / "redis")
    assert list(servers.values()) == ["redis-server"], servers


def test_stale_redis_files_lead_to_a_fresh_start(data_dir: Path) -> None:
    ensure_redis(data_dir)
    pid_file = data_dir / "redis" / "redis.pid"
    old_pid = _pid(pid_file)
    os.kill(old_pid, signal.SIGKILL)
    _wait_dead(old_pid)
    assert pid_file.exists() and (data_dir / "redis" / "redis.port").exists()  # left stale
    assert service_status(data_dir)["redis"] is None

    new_url = ensure_redis(data_dir)
    new_pid = _pid(pid_file)
    assert new_pid != old_pid
    client = redis.Redis.from_url(new_url)
    try:
        assert client.ping()
    finally:
        client.close()
    assert service_status(data_dir)["redis"] == new_url


def test_postgres_shared_between_processes(data_dir: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    url = ensure_postgres(data_dir)
    started_in = time.monotonic() - t0
    assert url.startswith("postgresql+psycopg2://")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
            conn.execute(sa.text("CREATE TABLE shared_probe (id int PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO shared_probe VALUES (42)"))
    finally:
        engine.dispose()

    [other] = _in_processes(data_dir, "ensure_postgres", 1, tmp_path / "barrier")
    assert other == url
    # The other process' URL reaches the same server: the table is there, via plain psycopg2.
    conn = psycopg2.connect(other.replace("+psycopg2", ""))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id FROM shared_probe")
            assert cur.fetchall() == [(42,)]
    finally:
        conn.close()
    assert _pid(data_dir / "postgres" / "postmaster.pid") in _live_pids(data_dir / "postgres")
    print(f"postgres cold start (initdb + start): {started_in:.3f}s")


def test_concurrent_ensure_postgres_starts_one_server(data_dir: Path, tmp_path: Path) -> None:
    urls = _in_processes(data_dir, "ensure_postgres", 3, tmp_path / "barrier")
    assert len(set(urls)) == 1, urls
    pid = _pid(data_dir / "postgres" / "postmaster.pid")
    # Exactly one postmaster: every postgres process under PGDATA is it or one of its children.
    for proc_pid in _live_pids(data_dir / "postgres"):
        stat = Path(f"/proc/{proc_pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert proc_pid == pid or int(stat[1]) == pid, (proc_pid, stat)


def test_postgres_with_a_long_data_path(tmp_path: Path) -> None:
    # Too long for a unix socket inside PGDATA: the library puts it in its runtime dir instead.
    data_dir = tmp_path / ("d" * 100) / "data"
    try:
        url = ensure_postgres(data_dir)
        assert f"host={data_dir}" not in url
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()
    finally:
        stop_services(data_dir)
    assert _live_pids(data_dir) == {}


def test_stop_services_stops_both_and_redis_data_survives(data_dir: Path) -> None:
    redis_url = ensure_redis(data_dir)
    pg_url = ensure_postgres(data_dir)
    assert service_status(data_dir) == {"redis": redis_url, "postgres": pg_url}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        client.set("survivor", "still here")
    finally:
        client.close()
    redis_pid = _pid(data_dir / "redis" / "redis.pid")
    pg_pid = _pid(data_dir / "postgres" / "postmaster.pid")

    t0 = time.monotonic()
    assert sorted(stop_services(data_dir)) == ["postgres", "redis"]
    stopped_in = time.monotonic() - t0
    _wait_dead(redis_pid, timeout=1)
    _wait_dead(pg_pid, timeout=1)
    assert _live_pids(data_dir) == {}
    assert service_status(data_dir) == {"redis": None, "postgres": None}
    assert stop_services(data_dir) == []

    # AOF was flushed by SHUTDOWN: the key is back after a restart (on a new port).
    t0 = time.monotonic()
    client = redis.Redis.from_url(ensure_redis(data_dir), decode_responses=True)
    restarted_in = time.monotonic() - t0
    try:
        assert client.get("survivor") == "still here"
    finally:
        client.close()
    # And postgres comes back on the same PGDATA.
    engine = sa.create_engine(ensure_postgres(data_dir))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
    print(f"stop both: {stopped_in:.3f}s, redis restart: {restarted_in:.3f}s")


def test_stop_services_on_missing_dir_is_a_no_op(tmp_path: Path) -> None:
    assert stop_services(tmp_path / "nothing") == []
    assert service_status(tmp_path / "nothing") == {"redis": None, "postgres": None}
    assert not (tmp_path / "nothing").exists()

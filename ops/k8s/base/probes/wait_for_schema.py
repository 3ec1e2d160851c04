"""initContainer: wait until PostgreSQL holds every migration this image ships.

    python /probes/wait_for_schema.py

The sluice-migrate Job applies the migrations (`sluice migrate --sink postgres`). A worker that
started before it finished would meet missing tables, and a missing table is not an error the
ingest task retries: the page would become a dead letter. So the pods that write wait here, for
the versions of schema/postgres/ in their own image, which also holds new pods of an upgrade back
until the Job of that upgrade has run. Exits 0 at once when SLUICE_POSTGRES_URL is unset (a
deployment without PostgreSQL).
"""

from __future__ import annotations

import os
import sys
import time

import psycopg2

from sluice.shared.database import libpq_dsn
from sluice.shared.migrations import migration_files

POLL_SECONDS = 5.0
SAY_EVERY_SECONDS = 30.0


def missing(url: str, wanted: list[str]) -> list[str]:
    """The wanted versions PostgreSQL has not recorded (all of them before the first migration)."""
    conn = psycopg2.connect(libpq_dsn(url), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('sluice_migrations') IS NOT NULL")
            row = cur.fetchone()
            if not row or not row[0]:
                return wanted
            cur.execute("SELECT version FROM sluice_migrations")
            done = {r[0] for r in cur.fetchall()}
    finally:
        conn.close()
    return [v for v in wanted if v not in done]


def main() -> int:
    url = os.environ.get("SLUICE_POSTGRES_URL")
    if not url:
        print("SLUICE_POSTGRES_URL is not set: no PostgreSQL schema to wait for")
        return 0
    wanted = [version for version, _ in migration_files("postgres")]
    said: float | None = None
    while True:
        try:
            lacking = missing(url, wanted)
            why = "waiting for the sluice-migrate Job to apply " + ", ".join(lacking)
        except psycopg2.Error as exc:
            lacking = wanted
            why = f"PostgreSQL not reachable yet: {str(exc).strip().splitlines()[0]}"
        if not lacking:
            print(f"PostgreSQL schema is current ({wanted[-1]})")
            return 0
        if said is None or time.monotonic() - said >= SAY_EVERY_SECONDS:
            print(why, flush=True)
            said = time.monotonic()
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main())

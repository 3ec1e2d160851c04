"""Scale: a KV namespace of many keys migrated through real workers into both sinks.

5,000 keys by default (the suite stays fast); `SLUICE_KV_SCALE_KEYS=50000` runs the full size
(measured figures are in ops/performance.md). Prints keys, records and seconds per phase."""

from __future__ import annotations

import os
import time

from sluice.ops.workers import WorkerPool
from sluice.producers.produce import run_source
from sluice.shared.celery_app import app
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.fakes.kv_server import FakeKV
from tests.helpers import drain
from tests.ops.test_reconcile import put_namespace
from tests.pipeline.test_kv_pipeline import PG_QUEUES, kv_config, lite_rows, pg_rows


def test_kv_namespace_at_scale_migrates_into_both_sinks(env: Env) -> None:
    keys = int(os.environ.get("SLUICE_KV_SCALE_KEYS", "5000"))
    with FakeKV() as fake:
        users = put_namespace(fake, keys)
        env.vars["CLOUDFLARE_API_TOKEN"] = fake.token
        env.write_config(kv_config(fake, page_size=1000))
        ctx = app.configure(Settings.load(env.vars))
        migrate_sqlite(env.sqlite_path)
        watch = sum(1 + i % 3 for i in range(users))
        expected = {
            "users": users,
            "watchlists": watch,
            "executions": 2 * users,
            "active_positions": users,
            "cache": 1,
        }
        pool = WorkerPool(env.vars, env.dir / "logs")
        try:
            pool.start("pg", PG_QUEUES, 2)
            pool.start_sqlite_writer()
            time.sleep(2)  # workers up before the clock starts
            t0 = time.perf_counter()
            first = run_source(ctx, "bot")
            enqueued = time.perf_counter() - t0
            assert first.status == "ok", first.error
            drain(ctx, "bot", timeout=600)
            total = time.perf_counter() - t0
        finally:
            pool.stop()
        requests = len(fake.requests)
    for table, n in expected.items():
        assert pg_rows(env.pg_url, f"SELECT count(*) FROM {table}") == [(n,)], table
        assert lite_rows(env, f"SELECT count(*) FROM {table}") == [(n,)], table
    assert pg_rows(env.pg_url, "SELECT count(*) FROM failed_ingestions") == [(0,)]
    assert pg_rows(env.pg_url, "SELECT status, keys_seen FROM source_migrations") == [
        ("complete", keys)
    ]
    records = sum(expected.values())
    # Child pages that reached a sink before their parents' page and waited (FK retries).
    (waited,) = pg_rows(env.pg_url, "SELECT count(*) FROM ingestion_runs WHERE attempts > 1")[0]
    print(
        f"\nKV scale: {keys} keys, {records} records, {first.pages} pages, {requests} API"
        f" requests; read+enqueued in {enqueued:.1f}s, committed to both sinks in {total:.1f}s"
        f" ({records / total:.0f} records/s per sink); {waited} PostgreSQL page(s) waited for"
        " their parents"
    )

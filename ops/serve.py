"""`sluice serve`: /metrics (Prometheus), /health and /status over HTTP, with the standard library.

- /metrics: ops/metrics.py, derived from the databases at each scrape.
- /health: 200 with JSON when the broker, PostgreSQL and the SQLite sink file are all reachable;
  503 naming the failing one(s) otherwise. Each check has a short timeout and they run side by
  side, so a dead server costs at most CHECK_TIMEOUT seconds.
- /status: the `sluice status --json` document.

Bind it to localhost or a private network: it has no authentication (like Flower's /metrics).
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from sqlalchemy.engine import Engine

from sluice.ops.metrics import registry_for
from sluice.ops.status import (
    broker_kind,
    collect_status,
    ops_engine,
    sqlite_reader,
    uses_postgres,
)
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn
from sluice.shared.state import state_kind

log = logging.getLogger("sluice.serve")

CHECK_TIMEOUT = 3.0


def check_broker(url: str) -> None:
    if broker_kind(url) == "redis":
        client = redis.Redis.from_url(
            url, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CHECK_TIMEOUT) as conn:
        conn.ensure_connection(max_retries=1)


def check_postgres(url: str) -> None:
    conn = psycopg2.connect(libpq_dsn(url), connect_timeout=int(CHECK_TIMEOUT))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()


def check_sqlite(ctx: Context) -> None:
    conn = sqlite_reader(ctx.settings.sqlite_path)
    try:
        found = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'ingestion_runs'"
        ).fetchone()[0]
    finally:
        conn.close()
    if not found:
        raise sqlite3.DatabaseError(
            "the sink file has no ingestion_runs table: run `sluice migrate`"
        )


def health_checks(ctx: Context) -> dict[str, Callable[[], None]]:
    checks: dict[str, Callable[[], None]] = {"broker": lambda: check_broker(ctx.broker_url)}
    if uses_postgres(ctx.settings):
        checks["postgres"] = lambda: check_postgres(ctx.postgres_url)
    tracking = ctx.settings.env.get("SLUICE_REDIS_URL")
    if tracking and tracking != ctx.broker_url:
        checks["redis"] = lambda: check_broker(tracking)
    if any("sqlite" in s.sinks for s in ctx.settings.streams.values()) or (
        state_kind(ctx.settings) == "sqlite"
    ):
        checks["sqlite"] = lambda: check_sqlite(ctx)
    return checks


def health(ctx: Context) -> tuple[int, dict[str, Any]]:
    checks = health_checks(ctx)

    def run(fn: Callable[[], None]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            fn()
            result: dict[str, Any] = {"ok": True}
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            result = {"ok": False, "error": f"{type(exc).__name__}: {first}".rstrip(": ")}
        result["ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return result

    with ThreadPoolExecutor(len(checks)) as pool:
        futures = {name: pool.submit(run, fn) for name, fn in checks.items()}
        results = {name: f.result() for name, f in futures.items()}
    failing = [name for name, r in results.items() if not r["ok"]]
    doc = {"status": "failing" if failing else "ok", "failing": failing, "checks": results}
    return (503 if failing else 200), doc


class SluiceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        ctx: Context,
        app: Any,
        *,
        inspect_timeout: float = 1.0,
        engine: Engine | None = None,
    ) -> None:
        # Set before binding: when the bind fails (address in use), the base class calls
        # server_close() before re-raising, and that must find no engine rather than none set.
        self.engine: Engine | None = None
        super().__init__(address, Handler)
        self.ctx = ctx
        self.app = app
        self.inspect_timeout = inspect_timeout
        if engine is None and uses_postgres(ctx.settings):
            engine = ops_engine(ctx.postgres_url)
        self.engine = engine
        self.registry: CollectorRegistry = registry_for(ctx, self.engine)
        self.status_lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        # One remote-control broadcast at a time: concurrent /status requests wait their turn.
        with self.status_lock:
            report = collect_status(
                self.ctx, self.app, timeout=self.inspect_timeout, engine=self.engine
            )
        return report.as_dict()

    def server_close(self) -> None:
        super().server_close()
        if self.engine is not None:
            self.engine.dispose()


class Handler(BaseHTTPRequestHandler):
    server: SluiceServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path == "/metrics":
                self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif path == "/health":
                code, doc = health(self.server.ctx)
                self._json(code, doc)
            elif path == "/status":
                self._json(200, self.server.status())
            elif path == "/":
                self._json(200, {"endpoints": ["/metrics", "/health", "/status"]})
            else:
                self._json(404, {"error": f"no such endpoint: {path}"})
        except Exception as exc:
            log.exception("GET %s failed", path)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _json(self, code: int, doc: Any) -> None:
        body = json.dumps(doc, default=str, indent=1).encode() + b"\n"
        self._send(code, body, "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def serve(ctx: Context, app: Any, host: str, port: int, inspect_timeout: float = 1.0) -> None:
    server = SluiceServer((host, port), ctx, app, inspect_timeout=inspect_timeout)
    print(
        f"sluice serve: http://{host}:{server.server_port} (/metrics /health /status)", flush=True
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return, so it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

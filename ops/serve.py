"""`sluice serve`: the console (ops/console/) and the endpoints beside it, on uvicorn: one
process, one port.

- /metrics: ops/metrics.py, derived from the databases at each scrape. Open, as Prometheus
  expects; it holds counts and ages, never a record or a secret.
- /health: 200 with JSON when the broker, PostgreSQL and the SQLite sink file are all reachable;
  503 naming the failing one(s) otherwise. Open, as orchestrators expect. Each check has a short
  timeout and they run side by side, so a dead server costs at most CHECK_TIMEOUT seconds.
- /status: the `sluice status --json` document; /stats: rows per sink table, the schema
  version and records per minute (ops/stats.py). Both need the console's credentials.
- /, /letters, /runs, /sources: the console's pages; /api/v1/: its JSON API.

Without credentials in the environment it only listens on a loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import psycopg2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sluice.ops.status import (
    broker_kind,
    sqlite_reader,
    uses_postgres,
)
from sluice.shared.context import Context
from sluice.shared.database import libpq_dsn
from sluice.shared.redis_client import open_redis
from sluice.shared.state import state_kind

log = logging.getLogger("sluice.serve")

CHECK_TIMEOUT = 3.0


def check_broker(url: str, master_name: str | None = None) -> None:
    if broker_kind(url) == "redis":
        client = open_redis(
            url, master_name, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT
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
    master = ctx.settings.broker_master
    checks: dict[str, Callable[[], None]] = {"broker": lambda: check_broker(ctx.broker_url, master)}
    if uses_postgres(ctx.settings):
        checks["postgres"] = lambda: check_postgres(ctx.postgres_url)
    tracking = ctx.settings.env.get("SLUICE_REDIS_URL")
    if tracking and tracking != ctx.broker_url:
        checks["redis"] = lambda: check_broker(tracking, master)
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


ENDPOINTS = ("/", "/health", "/metrics", "/status", "/stats", "/api/v1/docs")


def _json(code: int, doc: Any) -> Response:
    return JSONResponse(json.loads(json.dumps(doc, default=str)), status_code=code)


def open_routes() -> APIRouter:
    """/health and /metrics (open), /status and /stats (behind the console's credentials)."""
    from sluice.ops.console.app import console_of, guard

    router = APIRouter(include_in_schema=False)

    @router.get("/health")
    def health_route(request: Request) -> Response:
        code, doc = health(console_of(request).ctx)
        return _json(code, doc)

    @router.get("/metrics")
    def metrics_route(request: Request) -> Response:
        body = generate_latest(console_of(request).registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.get("/status", dependencies=[Depends(guard)])
    def status_route(request: Request) -> Response:
        return _json(200, console_of(request).status().as_dict())

    @router.get("/stats", dependencies=[Depends(guard)])
    def stats_route(request: Request) -> Response:
        return _json(200, console_of(request).stats().as_dict())

    return router


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(found) and all(ipaddress.ip_address(f[4][0]).is_loopback for f in found)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound before the server starts, so a taken port or an
    unknown host is an OSError here rather than a log line from inside uvicorn."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(ctx: Context, app: Any, host: str, port: int, inspect_timeout: float = 1.0) -> None:
    """Run the console until SIGTERM or Ctrl-C. Raises OSError when host:port cannot be bound."""
    import uvicorn

    from sluice.ops.console import create_app

    web = create_app(ctx, app, inspect_timeout=inspect_timeout)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"sluice serve: http://{shown}:{bound} ({' '.join(ENDPOINTS)})", flush=True)
    config = uvicorn.Config(web, log_level="warning", access_log=False, lifespan="on")
    # uvicorn stops gracefully on SIGTERM or Ctrl-C, then raises the signal again for the
    # handler in place before it: a no-op here, so a stop requested that way exits 0.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, frame: FrameType | None) -> None:
    """The server has already stopped when this runs."""

"""The console's application: one ASGI app serving the pages, the JSON API under /api/v1, and
the open endpoints that orchestrators and Prometheus scrape (/health, /metrics).

`create_app(ctx, celery)` builds it; `sluice serve` (ops/serve.py) runs it on uvicorn. Every
route but /health, /metrics, /login and the static files asks `guard` first: who is asking
(ops/console/auth.py), and for a POST, the CSRF token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote as urlquote

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client.registry import CollectorRegistry
from sqlalchemy.engine import Engine
from starlette.middleware.base import RequestResponseEndpoint

from sluice.ops.console.auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    ConsoleAuth,
    Sessions,
    csrf_ok,
    new_csrf_token,
)
from sluice.ops.metrics import registry_for
from sluice.ops.stats import Stats, collect_stats
from sluice.ops.status import collect_status, ops_engine, ops_state, uses_postgres
from sluice.ops.status_report import StatusReport
from sluice.shared.context import Context
from sluice.shared.errors import SluiceError
from sluice.shared.state import StateStore

HERE = Path(__file__).resolve().parent
log = logging.getLogger("sluice.console")

#: No inline script or style, nothing from another origin, never inside a frame.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass
class Console:
    """What the routes share: the context, the credentials, the databases' engines."""

    ctx: Context
    celery: Any
    auth: ConsoleAuth
    inspect_timeout: float = 1.0
    sessions: Sessions = field(default_factory=Sessions)
    engine: Engine | None = None
    store: StateStore = field(init=False)
    registry: CollectorRegistry = field(init=False)
    _status_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.engine is None and uses_postgres(self.ctx.settings):
            self.engine = ops_engine(self.ctx.postgres_url)
        self.store = ops_state(self.ctx.settings, self.engine)
        self.registry = registry_for(self.ctx, self.engine)

    def status(self) -> StatusReport:
        # One remote-control broadcast at a time: concurrent requests wait their turn.
        with self._status_lock:
            return collect_status(
                self.ctx, self.celery, timeout=self.inspect_timeout, engine=self.engine
            )

    def stats(self) -> Stats:
        return collect_stats(self.ctx.settings, self.engine)

    def close(self) -> None:
        self.store.dispose()
        if self.engine is not None:
            self.engine.dispose()


class NotAuthenticated(Exception):
    """No valid credentials came with the request."""


def console_of(request: Request) -> Console:
    console = request.app.state.console
    assert isinstance(console, Console)
    return console


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def identify(console: Console, request: Request) -> str | None:
    """How the request is authenticated: "bearer", "basic", "session", "open" (no credentials
    configured: loopback only), or None."""
    auth = console.auth
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return "bearer" if auth.token_ok(value.strip()) else None
    if scheme.lower() == "basic":
        return "basic" if auth.basic_ok(value) else None
    session = request.cookies.get(SESSION_COOKIE)
    if session and console.sessions.valid(session):
        return "session"
    return None if auth.configured else "open"


async def check_csrf(request: Request) -> None:
    """403 unless the request carries the CSRF cookie's value, in the X-CSRF-Token header or
    the form's csrf_token field."""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not csrf_ok(request.cookies.get(CSRF_COOKIE), sent):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


async def guard(request: Request) -> str:
    """Every protected route's first step: authenticate, then for a POST check its CSRF token
    (not for a Bearer token, which a browser never sends on its own)."""
    who = identify(console_of(request), request)
    if who is None:
        raise NotAuthenticated()
    if request.method not in ("GET", "HEAD", "OPTIONS") and who != "bearer":
        await check_csrf(request)
    request.state.who = who
    return who


def _error_json(code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=code, headers=dict(headers or {}))


def _explained(request: Request, exc: BaseException) -> Response | None:
    """The one-line explanation of an error a user can act on (see ops/commands/failures.py),
    as JSON or a page: 503 for what is unreachable, 400 for what was asked wrong."""
    from sluice.ops.commands.common import ExitCode
    from sluice.ops.commands.failures import explain
    from sluice.ops.console import web

    found = explain(exc)
    if found is None:
        return None
    code = 503 if found[0] == ExitCode.UNAVAILABLE else 400
    if is_api(request) or request.url.path in ("/status", "/stats"):
        return _error_json(code, found[1])
    return web.error_page(request, code, found[1])


def create_app(
    ctx: Context,
    celery: Any,
    *,
    auth: ConsoleAuth | None = None,
    inspect_timeout: float = 1.0,
    engine: Engine | None = None,
) -> FastAPI:
    """The console over `ctx` (settings, databases, broker); `celery` is the app whose workers
    status asks about. `auth` defaults to the credentials in the settings' environment."""
    from sluice.ops.console import api, pages, web
    from sluice.ops.serve import open_routes

    console = Console(
        ctx,
        celery,
        auth if auth is not None else ConsoleAuth.from_env(ctx.settings.env),
        inspect_timeout,
        engine=engine,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        console.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Sluice console API",
        version="1",
        summary="Dead letters, runs and sources of a Sluice deployment.",
        openapi_url=None,  # served by api.py, behind the credentials
        docs_url=None,
        redoc_url=None,
    )
    app.state.console = console
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(open_routes())
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.middleware("http")
    async def headers(request: Request, call_next: RequestResponseEndpoint) -> Response:
        token = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = token or new_csrf_token()
        response = await call_next(request)
        if not token:
            response.set_cookie(
                CSRF_COOKIE,
                request.state.csrf,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if is_api(request) or request.url.path in ("/status", "/stats"):
            challenge = ['Bearer realm="sluice"'] if console.auth.token else []
            if console.auth.user:
                challenge.append('Basic realm="sluice"')
            return _error_json(
                401,
                "authentication required: Authorization: Bearer $SLUICE_CONSOLE_TOKEN"
                " (or basic auth)",
                {"WWW-Authenticate": ", ".join(challenge)},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={urlquote(target, safe='')}", status_code=303)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if is_api(request) or request.url.path in ("/status", "/stats"):
            return _error_json(exc.status_code, str(exc.detail), exc.headers)
        return web.error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        if is_api(request):
            return _error_json(422, problems)
        return web.error_page(request, 422, problems)

    @app.exception_handler(SluiceError)
    async def refused(request: Request, exc: SluiceError) -> Response:
        # Our own errors name what was wrong (an unknown source, a bad time): the user's to fix.
        # A letter or run that does not exist is not found (404).
        from sluice.ops.dlq import UnknownLettersError
        from sluice.ops.runs import UnknownRunError

        if isinstance(exc, UnknownLettersError | UnknownRunError):
            if is_api(request):
                return _error_json(404, str(exc))
            return web.error_page(request, 404, str(exc))
        return _explained(request, exc) or _error_json(400, str(exc))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        # A database or broker that does not answer is said in one line (503), as the CLI says
        # it; anything else is a bug: 500, its traceback in the log.
        found = _explained(request, exc)
        if found is not None:
            return found
        log.exception("%s %s failed", request.method, request.url.path)
        if is_api(request):
            return _error_json(500, "internal error: see the sluice serve log")
        return web.error_page(request, 500, "Internal error: see the sluice serve log.")

    return app

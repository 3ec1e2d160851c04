"""The console's pages: server-rendered HTML over the same functions as the API. This module
holds logging in, the overview and the API's description; pages_letters, pages_runs and
pages_sources the rest."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from sluice.ops.console import pages_letters, pages_runs, pages_sources
from sluice.ops.console.app import check_csrf, console_of, guard
from sluice.ops.console.auth import SESSION_COOKIE
from sluice.ops.console.overview import overview_data
from sluice.ops.console.web import render

router = APIRouter(include_in_schema=False)
protected = APIRouter(include_in_schema=False, dependencies=[Depends(guard)])

FAILED_LOGIN_PAUSE = 1.0  # seconds


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of this site only (never `//host` or a URL)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


# -- login -------------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    console = console_of(request)
    return render(
        request, "login.html", methods=console.auth.methods, next=_safe_next(next), failed=False
    )


@router.post("/login")
async def login(request: Request) -> Response:
    await check_csrf(request)
    console = console_of(request)
    form = await request.form()
    token, user, password = (str(form.get(k) or "") for k in ("token", "user", "password"))
    target = _safe_next(str(form.get("next") or "/"))
    auth = console.auth
    ok = (bool(token) and auth.token_ok(token)) or (bool(user) and auth.password_ok(user, password))
    if not ok:
        # A pause per wrong guess: guessing the token through the form is slow.
        await asyncio.sleep(FAILED_LOGIN_PAUSE)
        return render(
            request,
            "login.html",
            status_code=401,
            methods=auth.methods,
            next=target,
            failed=True,
        )
    response = _see_other(target)
    response.set_cookie(
        SESSION_COOKIE,
        console.sessions.start(),
        max_age=int(console.sessions.lifetime),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@protected.post("/logout")
def logout(request: Request) -> Response:
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        console_of(request).sessions.end(session)
    response = _see_other("/login")
    response.delete_cookie(SESSION_COOKIE)
    return response


# -- overview ----------------------------------------------------------------------------------


@protected.get("/")
def overview(request: Request) -> HTMLResponse:
    return render(request, "overview.html", **overview_data(console_of(request)))


# -- API description ---------------------------------------------------------------------------


@protected.get("/api/v1/docs")
def api_docs(request: Request) -> HTMLResponse:
    schema = request.app.openapi()
    routes = [
        {"method": method.upper(), "path": path, **op}
        for path, methods in schema["paths"].items()
        for method, op in methods.items()
    ]
    return render(request, "docs.html", schema=schema, routes=routes)


router.include_router(protected)
router.include_router(pages_letters.router)
router.include_router(pages_runs.router)
router.include_router(pages_sources.router)

"""Rendering the console's pages: one Jinja2 environment with autoescape always on (a dead
letter's payload is attacker-controlled text), and the filters that format times and ages."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from sluice.ops.console.app import HERE, console_of
from sluice.ops.console.auth import CSRF_FIELD


def when(value: Any) -> str:
    """A time as the console shows it: UTC, to the second."""
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return str(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
    return str(value)


def age(seconds: Any) -> str:
    """A duration in words an operator reads at a glance: 45 s, 12 min, 3.5 h, 2.0 d."""
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def pretty(value: Any) -> str:
    """A payload as indented JSON text (escaped by the template like any other text)."""
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, age=age, pretty=pretty, number=number)
    return env


ENV = _environment()


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    console = console_of(request)
    page = ENV.get_template(template).render(
        request=request,
        csrf_field=CSRF_FIELD,
        csrf_token=getattr(request.state, "csrf", ""),
        who=getattr(request.state, "who", None),
        auth_configured=console.auth.configured,
        path=request.url.path,
        **context,
    )
    return HTMLResponse(page, status_code=status_code)


TITLES = {
    400: "Cannot do that",
    401: "Not logged in",
    403: "Refused",
    404: "Not found",
    409: "Could not do that",
    422: "Invalid input",
    500: "Internal error",
    503: "Unavailable",
}


def error_page(request: Request, code: int, message: str) -> HTMLResponse:
    title = TITLES.get(code, "Error")
    return render(request, "error.html", status_code=code, code=code, title=title, message=message)

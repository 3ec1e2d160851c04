"""What every command shares: exit codes, the common options, settings and output.

Imports nothing heavy at module level: every command loads this, and `sluice config check`
must not pay for Celery.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from sluice.shared.context import Context
    from sluice.shared.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(IntEnum):
    """What `sluice` exits with; scripts and supervisors may rely on these values."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "done, and nothing was found wrong"
    FAILED = (
        1,
        "the command ran but the outcome is not clean: a source run or a backfill failed,"
        " reconcile found a mismatch, status found a problem, a worker refused to scale,"
        " config check --online found a column missing from its table",
    )
    USAGE = (
        2,
        "what was asked cannot be done as asked: a bad option or argument, an unknown source"
        " or dead letter, a configuration file that is missing or invalid; fix the command line"
        " or the configuration",
    )
    UNAVAILABLE = (
        3,
        "a server, database, file or port could not be reached or used (Redis or PostgreSQL"
        " down, a port already taken); starting it, or retrying later, may succeed",
    )
    INTERRUPTED = 130, "stopped by Ctrl-C, as shells report SIGINT"


class CommandError(click.ClickException):
    """A failure the command explains in one line; `code` is what `sluice` exits with."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.code = code


#: Option types for counts that must be at least 1, or at least 0.
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def json_option(fn: F) -> F:
    """`--json`: the result as one JSON document on stdout (messages stay on stderr)."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the result as one JSON document on stdout, for scripts.",
    )(fn)


def timeout_option(fn: F) -> F:
    """`--timeout`: how long to wait for workers to answer a remote-control broadcast."""
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=1.0,
        metavar="SECONDS",
        help="How long to wait for running workers to answer.",
    )(fn)


def load_settings() -> Settings:
    """The settings of this process: $SLUICE_CONFIG (or ./sluice.toml) and the environment."""
    from sluice.shared.settings import Settings

    return Settings.load()


def pipeline_context(settings: Settings | None = None) -> Context:
    """Point the Celery app at the settings' broker and databases; the context to work in."""
    from sluice.shared.celery_app import app

    return app.configure(settings or load_settings())


def print_json(doc: Any) -> None:
    """One JSON document on stdout; times and other non-JSON values as their text."""
    click.echo(json.dumps(doc, default=str))


def warn(message: str) -> None:
    """A message for the operator, on stderr, prefixed like every other `sluice` message."""
    click.echo(f"sluice: {message}", err=True)

"""Errors a user can act on, as one line and an exit code instead of a traceback.

`explain(exc)` knows Sluice's own errors (a `SluiceError` names its source, stream or key) and
the ways a server or file can fail to answer; it returns None for anything else, which is a bug
and keeps its traceback. Messages never show a URL: they can hold passwords or API keys.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from typing import Any

from sluice.ops.commands.common import ExitCode

Failure = tuple[ExitCode, str]

_ENV_POSTGRES = "check SLUICE_POSTGRES_URL, or unset it for the embedded PostgreSQL"
_ENV_BROKER = "is it running? check SLUICE_BROKER_URL and SLUICE_REDIS_URL"
_ENV_SQLITE = "check SLUICE_SQLITE_PATH and SLUICE_DATA_DIR"
_MIGRATE = "run `sluice migrate` first"


def one_line(text: str) -> str:
    """The text's lines joined, so a multi-line driver message stays one line of output."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what it was explicitly raised from (`raise … from cause`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def explain(exc: BaseException) -> Failure | None:
    """(exit code, one-line message) for an error the user can act on; None for a bug."""
    for cause in _causes(exc):
        failure = _explain_one(cause)
        if failure is not None:
            return failure
    return None


def _explain_one(exc: BaseException) -> Failure | None:
    from sluice.shared.errors import ConfigError, ServiceError, SluiceError

    if isinstance(exc, ConfigError):
        head = str(exc).splitlines()[0].rstrip(":")
        return ExitCode.USAGE, f"{head}: " + "; ".join(one_line(p) for p in exc.problems)
    if isinstance(exc, SluiceError):
        code = ExitCode.UNAVAILABLE if exc.transient or isinstance(exc, ServiceError) else None
        return code or ExitCode.USAGE, one_line(str(exc))
    return _database(exc) or _broker(exc) or _system(exc)


def _database(exc: BaseException) -> Failure | None:
    import sqlite3

    import psycopg2
    from sqlalchemy import exc as sa

    if isinstance(exc, sa.ArgumentError) and re.search(
        r"Could not parse SQLAlchemy URL|Can't load plugin", str(exc)
    ):
        return ExitCode.USAGE, f"not a database URL: {one_line(str(exc))} ({_ENV_POSTGRES})"
    driver: Any = exc.orig if isinstance(exc, sa.DBAPIError) and exc.orig is not None else exc
    if not isinstance(driver, sqlite3.Error | psycopg2.Error):
        return None
    text = one_line(str(driver))
    if re.search(r"no such table|relation .* does not exist", text):
        return ExitCode.USAGE, f"the database has no table for that yet ({text}): {_MIGRATE}"
    if isinstance(driver, sqlite3.OperationalError):
        return ExitCode.UNAVAILABLE, f"cannot use the SQLite file: {text} ({_ENV_SQLITE})"
    if isinstance(driver, psycopg2.OperationalError | psycopg2.InterfaceError):
        return ExitCode.UNAVAILABLE, f"cannot reach PostgreSQL: {text} ({_ENV_POSTGRES})"
    return None


def _broker(exc: BaseException) -> Failure | None:
    import redis

    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return ExitCode.UNAVAILABLE, f"cannot reach Redis: {one_line(str(exc))} ({_ENV_BROKER})"
    from kombu.exceptions import OperationalError

    if isinstance(exc, OperationalError):
        return (
            ExitCode.UNAVAILABLE,
            f"cannot reach the broker: {one_line(str(exc))} ({_ENV_BROKER})",
        )
    return None


def _system(exc: BaseException) -> Failure | None:
    if not isinstance(exc, OSError):
        return None
    # HTTP client errors are OSErrors too; their text may carry a URL whose query holds a key.
    text = re.sub(r"\?[^\s'\")]*", "?…", one_line(str(exc)))
    if exc.errno == errno.EADDRINUSE:
        return ExitCode.UNAVAILABLE, f"{text}: another process listens there; choose another port"
    if isinstance(exc, ConnectionError | TimeoutError):
        return ExitCode.UNAVAILABLE, f"cannot connect: {text}"
    if exc.filename is not None and exc.strerror:
        return ExitCode.UNAVAILABLE, f"{exc.strerror}: {exc.filename}"
    return ExitCode.UNAVAILABLE, text

"""Sluice over HTTP: `sluice serve` (the console, /metrics, /health) and `sluice flower`."""

from __future__ import annotations

import errno
import os

import click

from sluice.ops.commands.common import (
    CommandError,
    ExitCode,
    load_settings,
    pipeline_context,
    timeout_option,
    warn,
)
from sluice.shared.celery_app import app

#: Errors of binding a listening socket, explained with the address instead of a traceback.
_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


@click.command()
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    default=9808,
    help="Port; 0 picks a free one.",
)
@timeout_option
def serve(host: str, port: int, timeout: float) -> ExitCode:
    """Serve the console (pages and /api/v1), /metrics, /health, /status and /stats.

    The console and its API need $SLUICE_CONSOLE_TOKEN (Bearer token, or the login form) or
    $SLUICE_CONSOLE_USER and $SLUICE_CONSOLE_PASSWORD (basic auth); without them it listens on
    a loopback address only. /metrics and /health stay open for Prometheus and orchestrators,
    and show no records or secrets. Runs until stopped (Ctrl-C or SIGTERM).

    \b
    Example:
      SLUICE_CONSOLE_TOKEN=$(openssl rand -hex 32) sluice serve --host 0.0.0.0 --port 9808
    """
    import socket

    from sluice.ops.console.auth import ConsoleAuth
    from sluice.ops.serve import is_loopback
    from sluice.ops.serve import serve as run

    settings = load_settings()
    auth = ConsoleAuth.from_env(settings.env)
    if not auth.configured and not is_loopback(host):
        raise CommandError(
            f"refusing to serve on {host} without authentication: set SLUICE_CONSOLE_TOKEN (or"
            " SLUICE_CONSOLE_USER and SLUICE_CONSOLE_PASSWORD), or listen on 127.0.0.1"
        )
    ctx = pipeline_context(settings)
    try:
        run(ctx, app, host, port, inspect_timeout=timeout)
    except socket.gaierror as exc:
        raise CommandError(
            f"cannot listen on {host}:{port}: unknown host ({exc.strerror})", ExitCode.UNAVAILABLE
        ) from exc
    except OSError as exc:
        if exc.errno not in _BIND_ERRORS:
            raise
        raise CommandError(
            f"cannot listen on {host}:{port}: {exc.strerror}; is another `sluice serve`"
            " running there? Choose another --port (0 picks a free one)",
            ExitCode.UNAVAILABLE,
        ) from exc
    return ExitCode.OK


@click.command()
@click.option(
    "--port", type=click.IntRange(1, 65535), metavar="PORT", default=5555, help="Port to listen on."
)
@click.option("--address", default="127.0.0.1", help="Address to listen on.")
@click.option("--url-prefix", help="Path Flower is served under, behind a reverse proxy.")
@click.option(
    "--no-auth",
    is_flag=True,
    help="Start without $SLUICE_FLOWER_AUTH: anyone who can reach the port can then see task"
    " arguments and resize or shut down workers. Not recommended.",
)
def flower(port: int, address: str, url_prefix: str | None, no_auth: bool) -> ExitCode:
    """Run Flower, Celery's web UI, on Sluice's broker.

    Shows workers, tasks and queue lengths (the waiting part; `sluice status` also counts
    what workers hold). Basic auth comes from $SLUICE_FLOWER_AUTH (user:password, several
    comma-separated); without it Flower does not start unless --no-auth is given. On a
    RabbitMQ broker, $SLUICE_FLOWER_BROKER_API gives Flower the management API for queues.

    \b
    Example:
      SLUICE_FLOWER_AUTH=ops:secret sluice flower --port 5555
    """
    auth = os.environ.get("SLUICE_FLOWER_AUTH", "").strip()
    if auth and not all(
        user and password for user, _, password in (a.partition(":") for a in auth.split(","))
    ):
        raise CommandError("SLUICE_FLOWER_AUTH must be user:password (several: comma-separated)")
    if not auth and not no_auth:
        raise CommandError(
            "refusing to start Flower without authentication: set"
            " SLUICE_FLOWER_AUTH=user:password, or pass --no-auth (anyone who can reach the port"
            " can then see task arguments and resize or shut down workers)"
        )
    if no_auth:
        warn(f"WARNING: Flower on {address}:{port} without authentication")
    app.configure(load_settings())
    # In-process, so the broker URL and the password never appear in argv (`ps`).
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if auth:
        argv.append(f"--basic-auth={auth}")
    broker_api = os.environ.get("SLUICE_FLOWER_BROKER_API")
    if broker_api:
        argv.append(f"--broker-api={broker_api}")
    if url_prefix:
        argv.append(f"--url-prefix={url_prefix}")
    code = app.start(argv)
    return ExitCode.FAILED if code else ExitCode.OK

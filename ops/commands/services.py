"""`sluice services`: the embedded Redis and PostgreSQL of the data folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from sluice.ops.commands.common import ExitCode, load_settings
from sluice.shared.embedded import ensure_postgres, ensure_redis, service_status, stop_services


def _start(data_dir: Path) -> None:
    click.echo(f"redis: {ensure_redis(data_dir)}")
    click.echo(f"postgres: {ensure_postgres(data_dir)}")


def _stop(data_dir: Path) -> None:
    stopped = stop_services(data_dir)
    click.echo("stopped: " + (", ".join(stopped) or "nothing was running"))


def _status(data_dir: Path) -> None:
    for name, url in service_status(data_dir).items():
        click.echo(f"{name}: {url or 'not running'}")


ACTIONS: dict[str, Callable[[Path], None]] = {"start": _start, "stop": _stop, "status": _status}


@click.command()
@click.argument("action", metavar="ACTION", type=click.Choice(list(ACTIONS)))
def services(action: str) -> ExitCode:
    """Start, stop or show the embedded Redis and PostgreSQL.

    With no SLUICE_BROKER_URL or SLUICE_POSTGRES_URL set, Sluice runs its own Redis and
    PostgreSQL in the data folder ($SLUICE_DATA_DIR, default .sluice), shared by every process
    that uses that folder: the first one that needs a server starts it. ACTION is start, stop
    or status (their URLs). Production sets the URLs instead.

    \b
    Examples:
      sluice services status
      SLUICE_DATA_DIR=.sluice/demo sluice services stop
    """
    ACTIONS[action](load_settings().data_dir)
    return ExitCode.OK

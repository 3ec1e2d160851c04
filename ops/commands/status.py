"""`sluice status`: the whole pipeline on one screen."""

from __future__ import annotations

import click

from sluice.ops.commands.common import (
    ExitCode,
    json_option,
    pipeline_context,
    print_json,
    timeout_option,
)
from sluice.ops.status import collect_status, render_status
from sluice.shared.celery_app import app


@click.command()
@json_option
@timeout_option
def status(as_json: bool, timeout: float) -> ExitCode:
    """Show queues, dead letters, sources and workers.

    Queue depths (waiting and unacked), dead letters pending by stream and error, each
    source's backlog age and last run, and the workers online by role. Each part is read on
    its own: one that cannot be read is reported, and the rest still shown. Exits 3 when
    PostgreSQL, the broker or the SQLite file cannot be reached (what lives there is shown as
    unknown), 1 when the report lists a problem (a failed run, dead letters pending, a queue
    no worker consumes, a part that cannot be read), 0 when it lists none.

    \b
    Examples:
      sluice status
      sluice status --json --timeout 3
    """
    report = collect_status(pipeline_context(), app, timeout=timeout)
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(render_status(report))
    if report.unreachable:
        return ExitCode.UNAVAILABLE
    return ExitCode.OK if report.ok else ExitCode.FAILED

"""`sluice scale`: resize running workers' pools through Celery remote control."""

from __future__ import annotations

import click

from sluice.ops.commands.common import (
    POSITIVE,
    ExitCode,
    json_option,
    pipeline_context,
    print_json,
    timeout_option,
)
from sluice.ops.scale import format_results, parse_autoscale
from sluice.ops.scale import scale as resize
from sluice.shared.celery_app import app
from sluice.shared.errors import SluiceError


def _autoscale(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_autoscale(value)
    except SluiceError as exc:
        raise click.BadParameter(exc.message.removeprefix("--autoscale: "), ctx, param) from None


@click.command()
@click.option("--grow", type=POSITIVE, metavar="N", help="Add N pool processes to each node.")
@click.option(
    "--shrink", type=POSITIVE, metavar="N", help="Remove N pool processes from each node."
)
@click.option(
    "--set", "set_to", type=POSITIVE, metavar="N", help="Resize each node's pool to N processes."
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    callback=_autoscale,
    help="Change the range of nodes started with --autoscale.",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="NAME",
    help="Only this worker node, e.g. postgres@host (repeatable). Default: every worker online.",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    metavar="ROLE",
    help="Only the nodes of this role (repeatable): postgres, sqlite, d1 or sluice, the name"
    " before @ that `sluice worker` gives by default.",
)
@timeout_option
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=15.0,
    metavar="SECONDS",
    help="How long to wait for the new sizes to show (a busy process first finishes its page).",
)
@json_option
def scale(
    grow: int | None,
    shrink: int | None,
    set_to: int | None,
    autoscale: tuple[int, int] | None,
    nodes: tuple[str, ...],
    roles: tuple[str, ...],
    timeout: float,
    wait: float,
    as_json: bool,
) -> ExitCode:
    """Resize running workers' pools, live.

    Give exactly one of --grow, --shrink, --set or --autoscale. Each node answers for itself,
    and the new sizes are read back from the workers. More processes help while a node has
    idle CPU and its database keeps up; past that, add nodes (another `sluice worker`
    elsewhere) instead. Only prefork pools can be resized: a threads pool (the SQLite writer)
    is reported as one that cannot be. Exits 1 when a node refused, cannot be resized or did
    not reach its new size.

    \b
    Examples:
      sluice scale --role postgres --set 4
      sluice scale --node postgres@db1 --set 8 --json
      sluice scale --grow 2
      sluice scale --autoscale 8,2
    """
    chosen = [grow, shrink, set_to, autoscale]
    if sum(x is not None for x in chosen) != 1:
        raise click.UsageError("give exactly one of --grow, --shrink, --set or --autoscale")
    pipeline_context()
    results = resize(
        app,
        grow=grow,
        shrink=shrink,
        set_to=set_to,
        autoscale=autoscale,
        nodes=list(nodes) or None,
        roles=list(roles) or None,
        timeout=timeout,
        wait=wait,
    )
    if as_json:
        print_json([r.as_dict() for r in results])
    else:
        click.echo(format_results(results))
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.FAILED

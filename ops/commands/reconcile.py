"""`sluice reconcile`: compare a D1 or KV source with every sink its streams write to."""

from __future__ import annotations

import click

from sluice.ops.commands.common import (
    NON_NEGATIVE,
    POSITIVE,
    ExitCode,
    json_option,
    load_settings,
    print_json,
)
from sluice.ops.commands.progress import Progress
from sluice.ops.reconcile import reconcile as compare
from sluice.ops.reconcile import render_reconcile


@click.command()
@click.argument("source")
@click.option(
    "--sample",
    type=NON_NEGATIVE,
    default=100,
    metavar="N",
    help="Keys per stream compared field by field (0: counts and keys only).",
)
@click.option("--seed", type=int, default=0, help="Seed of the sample, to repeat a comparison.")
@click.option(
    "--limit",
    type=POSITIVE,
    default=20,
    metavar="N",
    help="Keys listed per problem; the totals always count every key.",
)
@json_option
def reconcile(source: str, sample: int, seed: int, limit: int, as_json: bool) -> ExitCode:
    """Compare a source with its sinks.

    Reads every key of SOURCE (a D1 table or a KV namespace) and of each sink its streams
    write to, and reports keys missing from a sink, keys a sink has that the source does not
    (rows deleted at the source are reported apart where the capture mode keeps them), and,
    for a sample of keys, fields that differ. Exits 1 on a mismatch.

    \b
    Examples:
      sluice reconcile usage
      sluice reconcile bot --sample 1000 --seed 7 --json
    """
    settings = load_settings()
    settings.source(source)  # an unknown name fails before anything is printed
    # The comparison reports no counts as it goes: say what it does, and on a terminal for
    # how long.
    progress = Progress(f"reconcile {source}", "keys")
    with progress.working("reading the source and every sink its streams write to"):
        report = compare(settings, source, sample=sample, seed=seed, limit=limit)
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(render_reconcile(report))
    return ExitCode.OK if report.ok else ExitCode.FAILED

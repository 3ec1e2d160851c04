"""`sluice demo`: the whole pipeline on sample data, on this machine, offline."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import click

from sluice.ops.commands.common import POSITIVE, ExitCode, json_option, print_json
from sluice.ops.commands.progress import Progress
from sluice.ops.demo import DemoResult, run_demo
from sluice.shared.embedded import stop_services


@click.command()
@click.option(
    "--records",
    type=POSITIVE,
    metavar="N",
    default=200_000,
    help="Usage events in the sample D1 file.",
)
@click.option(
    "--workers", type=POSITIVE, metavar="N", default=2, help="PostgreSQL worker processes."
)
@click.option("--page-size", type=POSITIVE, metavar="N", default=1000, help="Records per page.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SLUICE_DATA_DIR",
    show_envvar=True,
    default=Path(".sluice/demo"),
    help="Folder for the sample, the SQLite sink, worker logs and the embedded servers.",
)
@json_option
@click.option(
    "--keep-services",
    is_flag=True,
    help="Leave the embedded Redis and PostgreSQL running afterwards, to look at the data.",
)
def demo(
    records: int,
    workers: int,
    page_size: int,
    data_dir: Path,
    as_json: bool,
    keep_services: bool,
) -> ExitCode:
    """Run the whole pipeline on sample data, offline.

    Writes a D1 file of usage events (about 10% repeated keys and a few invalid rows), starts
    the embedded Redis and PostgreSQL (unless SLUICE_BROKER_URL and SLUICE_POSTGRES_URL are
    set) and real worker processes, ingests everything into both sinks and reports what each
    inserted, skipped as duplicate and dead-lettered. A second run inserts nothing new.

    \b
    Examples:
      sluice demo
      sluice demo --records 20000 --json --keep-services
    """
    started_here = not (
        os.environ.get("SLUICE_BROKER_URL") and os.environ.get("SLUICE_POSTGRES_URL")
    )
    try:
        with Progress("demo, committed", "records", quiet=as_json) as progress:
            r = run_demo(
                records,
                data_dir,
                workers,
                page_size,
                progress=progress.say,
                advance=progress.advance,
            )
    finally:
        if started_here and not keep_services:
            stop_services(data_dir.resolve())
    if as_json:
        print_json(asdict(r))
        return ExitCode.OK
    click.echo("\n" + report(r))
    if started_here and not keep_services:
        click.echo("(embedded servers stopped; `sluice demo --keep-services` leaves them running)")
    return ExitCode.OK


def report(r: DemoResult) -> str:
    """The demo's counts per sink, speed and where its data is."""
    lines = [
        f"{'':<12}{'fetched':>10}{'inserted':>10}{'duplicates':>12}{'updated':>9}"
        f"{'dead letters':>14}",
        f"{'pipeline':<12}{r.fetched:>10}{r.inserted:>10}{r.duplicates:>12}{'':>9}"
        f"{r.dead_letters:>14}",
    ]
    for sink, c in r.sinks.items():
        lines.append(
            f"{sink:<12}{'':>10}{c['inserted']:>10}{c['duplicates']:>12}{c['updated']:>9}"
            f"{c['invalid']:>14}"
        )
    if any(c["updated"] for c in r.sinks.values()):
        lines.append(
            "(updated: repeats of a key whose earlier read reached the sink after a later one;"
            " the sink keeps the earlier read)"
        )
    lines.append(f"\n{r.fetched} records in {r.seconds}s: {r.records_per_second} records/s")
    lines += [f"{k:<12} {v}" for k, v in r.data.items()]
    return "\n".join(lines)

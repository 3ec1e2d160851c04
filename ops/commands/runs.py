"""`sluice runs`: the history of source runs and backfills, and one run with its pages."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

import click

from sluice.ops import runs as history
from sluice.ops.commands.common import (
    POSITIVE,
    ExitCode,
    json_option,
    pipeline_context,
    print_json,
    warn,
)
from sluice.ops.dlq import printable

TIME = "%Y-%m-%d %H:%M:%S"


def _before(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    at, sep, run_id = value.rpartition(",")
    try:
        t = datetime.fromisoformat(at)
    except ValueError:
        t = None
    if not sep or t is None or not run_id:
        raise click.BadParameter(
            f"expected TIME,RUN_ID as the previous page printed it, got {value!r}", ctx, param
        )
    return (t, run_id)


def _when(t: datetime | None) -> str:
    return t.strftime(TIME) if t else "-"


@click.group()
def runs() -> None:
    """Run history: list runs, show one with its pages.

    Every run of a source (scheduled, `sluice produce`, `sluice source run`) and every
    backfill started with `sluice source backfill` is recorded with its outcome, pages and
    records; the pages each sink committed are recorded beside them.

    \b
    Examples:
      sluice runs list --source usage --status failed
      sluice runs show 0f3c2a…
    """


@runs.command(name="list")
@click.option("--source", help="Only runs of this source.")
@click.option("--status", type=click.Choice(history.RUN_STATUSES), help="Only runs of this status.")
@click.option("--kind", type=click.Choice(history.RUN_KINDS), help="Only runs of this kind.")
@click.option("--limit", type=POSITIVE, default=50, metavar="N", help="At most N runs.")
@click.option(
    "--before",
    callback=_before,
    metavar="TIME,RUN_ID",
    help="The next page: runs before this one, as the previous page printed it.",
)
@json_option
def list_(
    source: str | None,
    status: str | None,
    kind: str | None,
    limit: int,
    before: Any,
    as_json: bool,
) -> ExitCode:
    """List runs, newest first.

    Each run with its source, kind, status, start, duration, pages, records and error. When
    more runs match, the option for the next page is printed on stderr.

    \b
    Examples:
      sluice runs list
      sluice runs list --source binance --status failed --limit 10 --json
    """
    page = history.list_runs(
        pipeline_context().state, history.RunFilters(source, status, kind, before, limit)
    )
    if as_json:
        print_json(page.rows)
    elif not page.rows:
        click.echo("no runs match")
    else:
        click.echo(
            f"{'run':<34}{'source':<16}{'kind':<10}{'status':<10}{'started':<20}"
            f"{'secs':>8}{'pages':>7}{'records':>9}  error"
        )
        for r in page.rows:
            secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
            click.echo(
                f"{printable(r['run_id']):<34}{printable(r['source']):<16}{r['kind']:<10}"
                f"{r['status']:<10}{_when(r['started_at']):<20}{secs:>8}{r['pages']:>7}"
                f"{r['records']:>9}  {printable(r['error'] or '')[:80]}"
            )
    if page.next_before is not None:
        at, run_id = page.next_before
        warn(f"more runs match: add --before '{at.isoformat()},{run_id}' for the next page")
    return ExitCode.OK


@runs.command()
@click.argument("run_id")
@json_option
def show(run_id: str, as_json: bool) -> ExitCode:
    """Show one run with its pages and their dead letters.

    Prints RUN_ID's outcome, then each page a sink committed (received, inserted, duplicates,
    invalid) and the dead letters of those pages; a backfill also shows its windows done.

    \b
    Examples:
      sluice runs show 0f3c2a9d4e5b4c6f8a7b1c2d3e4f5a6b
      sluice runs show 0f3c2a9d4e5b4c6f8a7b1c2d3e4f5a6b --json
    """
    d = history.show_run(pipeline_context().state, run_id)
    if as_json:
        print_json(asdict(d))
        return ExitCode.OK
    r = d.run
    click.echo(
        f"run {printable(r['run_id'])}: {r['kind']} of {printable(r['source'])}, {r['status']}"
    )
    click.echo(f"  started {_when(r['started_at'])}, finished {_when(r['finished_at'])}")
    click.echo(f"  {r['pages']} page(s), {r['records']} record(s) enqueued")
    if r["detail"]:
        click.echo(f"  detail: {printable(r['detail'])}")
    if r["error"]:
        click.echo(f"  error: {printable(r['error'])}")
    if d.pages:
        click.echo(
            f"  {'page':<34}{'sink':<10}{'received':>9}{'inserted':>9}{'dupes':>7}{'invalid':>8}"
        )
        for p in d.pages:
            click.echo(
                f"  {printable(p['page_id']):<34}{p['sink']:<10}{p['received']:>9}"
                f"{p['inserted']:>9}{p['duplicates']:>7}{p['invalid']:>8}"
            )
    else:
        click.echo("  no page committed to this store")
    if d.letters_total:
        click.echo(f"  {d.letters_total} dead letter(s):")
        for x in d.letters:
            click.echo(
                f"    {x['id']:>8}  {x['sink']:<9}{x['status']:<10}"
                f"{printable(x['record_key'])[:24]:<26}"
                f"{printable(x['error_class'] + ': ' + x['error_message'])[:80]}"
            )
    return ExitCode.OK

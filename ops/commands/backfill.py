"""`sluice backfill`: fetch a past range of an HTTP source again, resumably."""

from __future__ import annotations

from datetime import datetime

import click

from sluice.ops.backfill import BackfillSummary, parse_time, run_backfill
from sluice.ops.commands.common import (
    POSITIVE,
    ExitCode,
    F,
    json_option,
    pipeline_context,
    print_json,
)
from sluice.ops.commands.progress import Progress


def _iso_time(ctx: click.Context, param: click.Parameter, value: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter(
            f"expected an ISO date or time such as 2024-01-01 or 2024-01-01T00:00:00Z,"
            f" got {value!r}",
            ctx,
            param,
        ) from None


def time_range(fn: F) -> F:
    """The `--from`/`--to` options of a range to fetch again: [start, end)."""
    fn = click.option(
        "--to",
        "end",
        metavar="ISO",
        callback=_iso_time,
        required=True,
        help="End of the range (exclusive).",
    )(fn)
    return click.option(
        "--from",
        "start",
        metavar="ISO",
        callback=_iso_time,
        required=True,
        help="Start of the range, e.g. 2024-01-01 or 2024-01-01T00:00:00Z (UTC if no zone).",
    )(fn)


@click.command()
@click.argument("source")
@time_range
@click.option(
    "--max-windows",
    type=POSITIVE,
    metavar="N",
    help="Stop after N windows; run the same command again to continue.",
)
@json_option
def backfill(
    source: str, start: datetime, end: datetime, max_windows: int | None, as_json: bool
) -> ExitCode:
    """Fetch a past range of an HTTP source again.

    Splits [--from, --to) into the windows the API of SOURCE serves in one call, per partition
    (symbol, pair, coin, site), and enqueues them as pages exactly as a run does; the keyed
    writes make it safe to repeat. Progress is stored after each window, so a stopped backfill
    continues where it was. Exits 1 when part of the range could not be fetched (a partition
    failed or the API stopped paging) or another backfill holds the source.

    \b
    Examples:
      sluice backfill binance --from 2024-01-01 --to 2024-02-01
      sluice backfill coingecko --from 2024-06-01 --to 2024-06-08 --max-windows 10 --json
    """
    ctx = pipeline_context()
    with Progress(f"backfill {source}", "windows") as progress:
        r = run_backfill(
            ctx,
            source,
            start,
            end,
            progress.say,
            max_windows=max_windows,
            advance=progress.advance,
        )
    if as_json:
        print_json(r.as_dict())
    else:
        click.echo(summary_line(r))
    # Not clean when part of the range could not be fetched: a partition failed (`partial`,
    # `failed`) or was cut short (`incomplete`), or another backfill holds the source.
    ok = r.status in ("complete", "stopped") and not r.incomplete and not r.failed
    return ExitCode.OK if ok else ExitCode.FAILED


def summary_line(r: BackfillSummary) -> str:
    """The backfill's outcome in one line."""
    return (
        f"{r.source} {r.start}..{r.end}: {r.status}, {r.windows_done}/{r.windows_total}"
        f" window(s) done ({r.windows_this_run} this run), {r.pages} page(s),"
        f" {r.records} record(s)"
        + (f", {r.rejected} dead letter(s)" if r.rejected else "")
        + f" enqueued in {r.seconds}s"
        + (f" — {r.error}" if r.error else "")
    )

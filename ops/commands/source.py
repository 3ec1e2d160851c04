"""`sluice source`: pause, resume, run now, reset a cursor, backfill a range."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime

import click

from sluice.ops import sources
from sluice.ops.commands.backfill import _iso_time, time_range
from sluice.ops.commands.common import (
    CommandError,
    ExitCode,
    json_option,
    pipeline_context,
    print_json,
)

# Outcomes after which a backfill being followed is over.
_BACKFILL_DONE = ("complete", "stopped", "partial", "failed", "skipped")


@click.group()
def source() -> None:
    """Steer sources: pause, resume, run now, reset, backfill.

    A paused source is skipped by beat and `sluice produce` (they say so) until resumed; the
    pause is kept in the state store, so it holds across restarts and machines.

    \b
    Examples:
      sluice source pause binance --reason "API maintenance"
      sluice source run usage
    """


@source.command()
@click.argument("name")
@click.option("--reason", help="Why, shown by `sluice status` and the console.")
@json_option
def pause(name: str, reason: str | None, as_json: bool) -> ExitCode:
    """Pause a source: its scheduled runs are skipped.

    NAME stays paused until `sluice source resume`; runs already going finish.

    \b
    Example:
      sluice source pause binance --reason "API maintenance"
    """
    ctx = pipeline_context()
    c = sources.pause(ctx, ctx.state, name, reason)
    if as_json:
        print_json(asdict(c))
    else:
        click.echo(f"{name}: paused" + (f" ({reason})" if reason else ""))
    return ExitCode.OK


@source.command()
@click.argument("name")
@json_option
def resume(name: str, as_json: bool) -> ExitCode:
    """Resume a paused source.

    NAME runs again at its next scheduled time (or now, with `sluice source run`).

    \b
    Example:
      sluice source resume binance
    """
    ctx = pipeline_context()
    c = sources.resume(ctx, ctx.state, name)
    if as_json:
        print_json(asdict(c))
    else:
        click.echo(f"{name}: resumed")
    return ExitCode.OK


@source.command()
@click.argument("name")
@json_option
def run(name: str, as_json: bool) -> ExitCode:
    """Queue one run of a source now; prints its run id.

    A worker consuming the produce queue runs NAME as a scheduled run would; follow it with
    `sluice runs show RUN_ID`. A paused source is refused. To run in this process instead,
    use `sluice produce`.

    \b
    Example:
      sluice source run usage
    """
    run_id = sources.run_now(pipeline_context(), name)
    if as_json:
        print_json({"source": name, "run_id": run_id})
    else:
        click.echo(run_id)
    return ExitCode.OK


@source.command()
@click.argument("name")
@click.option(
    "--to",
    "to",
    metavar="ISO",
    callback=_iso_time,
    required=True,
    help="The time to put the cursor at, e.g. 2024-01-01T00:00:00Z (UTC if no zone).",
)
@click.option("--yes", is_flag=True, help="Reset without asking to confirm.")
@json_option
def reset(name: str, to: datetime, yes: bool, as_json: bool) -> ExitCode:
    """Put an HTTP source's cursors at a time.

    Every partition of NAME is read from --to on at its next run (less its lookback): back in
    time re-reads data (the keyed writes absorb it), forward skips it. Asks to confirm unless
    --yes (declined: exit 1, nothing changed). D1 and KV sources keep no time cursor: refused.

    \b
    Example:
      sluice source reset binance --to 2024-06-01T00:00:00Z --yes
    """
    ctx = pipeline_context()
    if not yes and not click.confirm(
        f"reset every cursor of {name} to {to.isoformat()}?", err=True
    ):
        raise CommandError("not confirmed: no cursor changed", ExitCode.FAILED)
    r = sources.reset_cursor(ctx, name, to)
    if as_json:
        print_json(asdict(r))
    else:
        click.echo(f"{name}: {len(r.before)} cursor(s) now at {r.to.isoformat()}")
        for p, old in r.before.items():
            click.echo(f"  {p or '(all)'}: was {old or 'unset'}")
    return ExitCode.OK


@source.command()
@click.argument("name")
@time_range
@click.option("--follow", is_flag=True, help="Print its progress until it ends.")
@json_option
def backfill(name: str, start: datetime, end: datetime, follow: bool, as_json: bool) -> ExitCode:
    """Queue a backfill of an HTTP source's range on the workers; prints its run id.

    A worker fetches [--from, --to) of NAME as `sluice backfill` does, recording its windows
    done as it goes: `sluice runs show RUN_ID`, or --follow, shows them. Exits 1 when a
    followed backfill does not complete.

    \b
    Example:
      sluice source backfill binance --from 2024-01-01 --to 2024-02-01 --follow
    """
    ctx = pipeline_context()
    run_id = sources.start_backfill(ctx, name, start, end)
    if not follow:
        if as_json:
            print_json({"source": name, "run_id": run_id})
        else:
            click.echo(run_id)
        return ExitCode.OK
    click.echo(f"backfill {run_id} queued", err=True)  # progress on stderr, as --json says
    seen = None
    while True:
        p = sources.backfill_progress(ctx.state, run_id)
        line = f"{p.status}: {p.windows_done}/{p.windows_total} window(s), {p.records} record(s)"
        if line != seen:
            click.echo(line, err=True)
            seen = line
        if p.status in _BACKFILL_DONE:
            break
        time.sleep(1)
    if as_json:
        print_json(asdict(p))
    elif p.error:
        click.echo(f"{name}: {p.status} — {p.error}")
    else:
        click.echo(f"{name}: {p.status}")
    return ExitCode.OK if p.status in ("complete", "stopped") else ExitCode.FAILED

"""`sluice dlq`: list, show, replay and discard dead letters (`failed_ingestions`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from sluice.ops import dlq as letters
from sluice.ops.commands.common import (
    POSITIVE,
    ExitCode,
    F,
    json_option,
    pipeline_context,
    print_json,
)
from sluice.shared.errors import SluiceError
from sluice.shared.letters import SOURCE_SINK
from sluice.shared.settings import SINK_NAMES

ALL = "all"  # --status value that selects letters of every status


def _check_since(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Checked now, so a typo fails before any database is opened; kept as text, because a
    # relative time is counted back from the moment the query runs.
    if value is not None:
        try:
            letters.since_time(value)
        except SluiceError as exc:
            raise click.BadParameter(exc.message.removeprefix("--since: "), ctx, param) from None
    return value


def letter_filters(fn: F) -> F:
    """The selection shared by list, replay and discard: ids, or filters on the letters'
    columns. The command gets it as one `filters` argument (an ops.dlq.Filters)."""
    options: list[Callable[[Any], Any]] = [
        click.argument("ids", nargs=-1, type=int),
        click.option("--stream", help="Only letters of this stream, e.g. usage_events."),
        click.option(
            "--sink",
            type=click.Choice([*SINK_NAMES, SOURCE_SINK]),
            help=f"Only letters this sink refused, or '{SOURCE_SINK}' for items a source"
            " could not turn into records.",
        ),
        click.option("--error", help="Only letters whose error class or message contains this."),
        click.option("--source", help="Only letters from this source."),
        click.option(
            "--since",
            callback=_check_since,
            help="Only letters that last failed since then: an ISO time, or 30m, 2h, 7d ago.",
        ),
        click.option(
            "--status",
            type=click.Choice([*letters.STATUSES, ALL]),
            default="pending",
            help="Only letters of this status.",
        ),
        click.option(
            "--limit", type=POSITIVE, metavar="N", help="At most N letters, oldest first."
        ),
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        status = kwargs.pop("status")
        kwargs["filters"] = letters.Filters(
            ids=list(kwargs.pop("ids")) or None,
            stream=kwargs.pop("stream"),
            sink=kwargs.pop("sink"),
            error=kwargs.pop("error"),
            source=kwargs.pop("source"),
            since=kwargs.pop("since"),
            status=None if status == ALL else status,
            limit=kwargs.pop("limit"),
        )
        return fn(**kwargs)

    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


@click.group()
def dlq() -> None:
    """Dead letters: list, show, replay, discard.

    A dead letter is a record that could not be written (invalid, or refused by a sink), kept
    exactly as it arrived with its error, attempts and origin. Fix the cause, then replay it:
    a replay never duplicates, and a record that fails again comes back as pending.

    \b
    Examples:
      sluice dlq list --stream usage_events --since 2h
      sluice dlq replay --error RejectedBySink --dry-run
    """


@dlq.command(name="list")
@letter_filters
@json_option
def list_(filters: letters.Filters, as_json: bool) -> ExitCode:
    """List dead letters as a table.

    Selects by IDS, or by the filters (default: every pending letter), oldest first. Control
    characters in keys and messages are shown escaped, so a record cannot disturb the terminal.

    \b
    Examples:
      sluice dlq list
      sluice dlq list --sink postgres --error ForeignKey --limit 20 --json
    """
    rows = letters.list_letters(pipeline_context().state, filters)
    if as_json:
        print_json(rows)
    else:
        click.echo(letters.format_table(rows))
    return ExitCode.OK


@dlq.command()
@click.argument("letter_id", metavar="ID", type=int)
def show(letter_id: int) -> ExitCode:
    """Show one dead letter with its record and error.

    Prints every column of letter ID as JSON, the record decoded exactly as it arrived.

    \b
    Example:
      sluice dlq show 42
    """
    row = letters.show_letter(pipeline_context().state, letter_id)
    click.echo(json.dumps(row, default=str, indent=2))
    return ExitCode.OK


@dlq.command()
@letter_filters
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; change nothing.")
def replay(filters: letters.Filters, dry_run: bool) -> ExitCode:
    """Re-enqueue dead letters as pages; never duplicates.

    Sends the selected letters' records (IDS, or the filters; default: every pending letter),
    exactly as stored, to their sink's queue and marks them replayed; the sinks' keyed writes
    make a second replay harmless. Letters of items a source could not read hold no record
    and are counted as not replayable.

    \b
    Examples:
      sluice dlq replay 17 18
      sluice dlq replay --stream usage_events --since 1d --dry-run
    """
    r = letters.replay(pipeline_context(), filters, dry_run=dry_run)
    verb = "would replay" if dry_run else "replayed"
    click.echo(
        f"{verb} {r.records} record(s) in {r.pages} page(s)"
        + (f"; {r.skipped} not replayable (unreadable messages)" if r.skipped else "")
    )
    return ExitCode.OK


@dlq.command()
@letter_filters
def discard(filters: letters.Filters) -> ExitCode:
    """Mark dead letters as discarded.

    For letters that will never be replayed (IDS, or the filters; default: every pending
    letter). They stay in the table, with status discarded.

    \b
    Example:
      sluice dlq discard --stream usage_events --error "NaN"
    """
    click.echo(f"discarded {letters.discard(pipeline_context().state, filters)} dead letter(s)")
    return ExitCode.OK

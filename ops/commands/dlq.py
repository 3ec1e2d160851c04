"""`sluice dlq`: find, group, replay, discard, re-fetch and edit dead letters
(`failed_ingestions`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from sluice.ops import dlq as letters
from sluice.ops.commands.common import (
    POSITIVE,
    CommandError,
    ExitCode,
    F,
    json_option,
    pipeline_context,
    print_json,
    warn,
)
from sluice.shared.errors import SluiceError
from sluice.shared.letters import SOURCE_SINK
from sluice.shared.settings import SINK_NAMES

ALL = "all"  # --status value that selects letters of every status
DEFAULT_PAGE = 50  # letters `dlq list` shows at a time
TIME = "%Y-%m-%d %H:%M:%S"


def _check_since(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Checked now, so a typo fails before any database is opened; kept as text, because a
    # relative time is counted back from the moment the query runs.
    if value is not None:
        try:
            letters.since_time(value)
        except SluiceError as exc:
            raise click.BadParameter(exc.message.split(": ", 1)[-1], ctx, param) from None
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
        click.option("--error-class", help="Only letters of exactly this error class."),
        click.option(
            "--text", help="Only letters whose key, error class or message contains this text."
        ),
        click.option("--source", help="Only letters from this source."),
        click.option(
            "--since",
            callback=_check_since,
            help="Only letters that last failed since then: an ISO time, or 30m, 2h, 7d ago.",
        ),
        click.option(
            "--until",
            callback=_check_since,
            help="Only letters that last failed before then: an ISO time, or 30m, 2h, 7d ago.",
        ),
        click.option(
            "--status",
            type=click.Choice([*letters.STATUSES, ALL]),
            default="pending",
            help="Only letters of this status.",
        ),
        click.option(
            "--limit",
            type=POSITIVE,
            metavar="N",
            help="At most N letters (list: newest first, 50 by default; others: oldest first).",
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
            error_class=kwargs.pop("error_class"),
            text=kwargs.pop("text"),
            until=kwargs.pop("until"),
        )
        return fn(**kwargs)

    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


@click.group()
def dlq() -> None:
    """Dead letters: list, group, show, replay, discard, re-fetch, edit.

    A dead letter is a record that could not be written (invalid, or refused by a sink), kept
    exactly as it arrived with its error, attempts and origin. Fix the cause, then replay it:
    a replay never duplicates, and a record that fails again comes back as pending.

    \b
    Examples:
      sluice dlq list --stream usage_events --since 2h
      sluice dlq groups
      sluice dlq replay --error-class RejectedBySink --dry-run
    """


@dlq.command(name="list")
@letter_filters
@click.option(
    "--after",
    type=int,
    metavar="ID",
    help="The next page: letters with ids below ID (the last id of the page before).",
)
@json_option
def list_(filters: letters.Filters, after: int | None, as_json: bool) -> ExitCode:
    """List dead letters as a table, newest first.

    Selects by IDS, or by the filters (default: every pending letter), a page of --limit at a
    time: when more match, the command for the next page is printed on stderr. Control
    characters in keys and messages are shown escaped, so a record cannot disturb the terminal.

    \b
    Examples:
      sluice dlq list
      sluice dlq list --error-class RejectedBySink --text usr_42 --limit 20 --json
      sluice dlq list --after 1200
    """
    filters.after_id = after
    page = letters.page_letters(
        pipeline_context().state, filters, limit=filters.limit or DEFAULT_PAGE
    )
    if as_json:
        print_json(page.rows)
    else:
        click.echo(letters.format_table(page.rows))
    if page.next_after_id is not None:
        warn(f"more letters match: add --after {page.next_after_id} for the next page")
    return ExitCode.OK


@dlq.command()
@letter_filters
@json_option
def groups(filters: letters.Filters, as_json: bool) -> ExitCode:
    """Count dead letters per error class.

    Selects as `list` does, by IDS or the filters (default: every pending letter), and prints
    each error class with its count and the times of its first and last failure, the largest
    group first: where a wave of failures started, and whether it goes on.

    \b
    Examples:
      sluice dlq groups
      sluice dlq groups --stream usage_events --since 1d --json
    """
    found = letters.error_groups(pipeline_context().state, filters)
    if as_json:
        print_json([asdict(g) for g in found])
        return ExitCode.OK
    if not found:
        click.echo("no dead letters match")
        return ExitCode.OK
    click.echo(f"{'count':>9}  {'first failure':<20}{'last failure':<20}error class")
    for g in found:
        first = g.first_at.strftime(TIME) if g.first_at else "-"
        last = g.last_at.strftime(TIME) if g.last_at else "-"
        click.echo(f"{g.count:>9}  {first:<20}{last:<20}{letters.printable(g.error_class)}")
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
@json_option
def replay(filters: letters.Filters, dry_run: bool, as_json: bool) -> ExitCode:
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
    if as_json:
        print_json({**asdict(r), "dry_run": dry_run})
        return ExitCode.OK
    verb = "would replay" if dry_run else "replayed"
    click.echo(
        f"{verb} {r.records} record(s) in {r.pages} page(s)"
        + (
            f"; {r.skipped} hold no record to replay (items a source could not read:"
            " fix them at the source, then `sluice dlq refetch`)"
            if r.skipped
            else ""
        )
    )
    return ExitCode.OK


@dlq.command()
@letter_filters
@click.option("--dry-run", is_flag=True, help="Count what would be discarded; change nothing.")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Discard every letter of the status when no ids or filters are given.",
)
@json_option
def discard(filters: letters.Filters, dry_run: bool, everything: bool, as_json: bool) -> ExitCode:
    """Mark dead letters as discarded.

    For letters that will never be replayed: IDS, or the filters. Without either it refuses,
    unless --all says every letter of the status (default: pending) is meant. They stay in the
    table, with status discarded.

    \b
    Examples:
      sluice dlq discard --stream usage_events --error-class ValidationError --dry-run
      sluice dlq discard 42 43
    """
    try:
        n = letters.discard(pipeline_context().state, filters, dry_run, everything)
    except letters.NoFilterError as exc:
        raise CommandError(exc.message) from None
    if as_json:
        print_json({"discarded": n, "dry_run": dry_run})
    else:
        click.echo(f"{'would discard' if dry_run else 'discarded'} {n} dead letter(s)")
    return ExitCode.OK


@dlq.command()
@click.argument("ids", nargs=-1, type=int, required=True)
@json_option
def refetch(ids: tuple[int, ...], as_json: bool) -> ExitCode:
    """Read dead letters' records again from their source and queue them.

    For a record that was invalid at its source and has since been fixed there: each of IDS
    is read again by its key (a D1 table's row, a KV key) and queued as a replay is, when its
    stream accepts it; the letter keeps the record as it failed. A key the source no longer
    holds, or a record still invalid, is named and its letter left pending (exit 1). HTTP API
    sources cannot be read by key: use `sluice backfill` for their range.

    \b
    Example:
      sluice dlq refetch 17 18
    """
    r = letters.refetch(pipeline_context(), list(ids))
    if as_json:
        print_json(asdict(r))
    else:
        click.echo(f"refetched {len(r.refetched)} letter(s): {r.records} record(s) queued")
        for m in r.missing:
            click.echo(f"  {m['id']}: source {m['source']} no longer holds key {m['key']!r}")
        for m in r.invalid:
            click.echo(f"  {m['id']}: still invalid at its source: {m['error']}")
    return ExitCode.FAILED if r.missing or r.invalid else ExitCode.OK


def _value(text: str) -> Any:
    """A --set value: JSON when it reads as JSON (42, 1.5, null, true, {"a": 1}), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@dlq.command()
@click.argument("letter_id", metavar="ID", type=int)
@click.option(
    "--file",
    "path",
    type=click.File("r"),
    help="The whole edited record: a JSON object of column to value ('-': stdin).",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Change one field of the stored record (repeatable); VALUE is JSON, or else text.",
)
@json_option
def edit(letter_id: int, path: Any, assignments: tuple[str, ...], as_json: bool) -> ExitCode:
    """Queue an edited record in place of a dead letter's.

    Starts from letter ID's record (or the record in --file), applies each --set, checks the
    result against its stream and queues it as a replay is. An edit the stream would refuse is
    refused with the reason and nothing changes; the letter keeps the record as it failed
    beside the edited one (see `sluice dlq show`).

    \b
    Examples:
      sluice dlq edit 42 --set metric_value=1.5
      sluice dlq edit 42 --file fixed.json
    """
    if path is None and not assignments:
        raise CommandError("nothing to edit: give --file, or --set FIELD=VALUE")
    ctx = pipeline_context()
    if path is not None:
        try:
            record = json.load(path)
        except ValueError as exc:
            raise CommandError(f"--file: not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise CommandError("--file: expected a JSON object of column to value")
    else:
        record = letters.record_values(letters.show_letter(ctx.state, letter_id))
        if not record:
            raise CommandError(
                f"letter {letter_id} holds no record of columns to edit: give the whole"
                " record with --file"
            )
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise CommandError(f"--set: expected FIELD=VALUE, got {assignment!r}")
        record[name] = _value(value)
    r = letters.edit(ctx, letter_id, record)
    if as_json:
        print_json(asdict(r))
    else:
        click.echo(f"letter {letter_id}: edited record queued in {r.pages} page(s)")
    return ExitCode.OK

"""`sluice prune`: delete what `[retention]` keeps no longer; also run daily by beat."""

from __future__ import annotations

from typing import cast

import click

from sluice.ops.commands.common import ExitCode, json_option, load_settings, print_json, warn


@click.command()
@click.option(
    "--dry-run",
    is_flag=True,
    help="Count what would be deleted (and kept) without deleting or recording anything.",
)
@click.option(
    "--only",
    type=click.Choice(["d1", "letters", "runs", "cache"]),
    help="Prune one kind of target: D1 source rows, resolved dead letters, run history"
    " (rolled up into daily totals first) or expired cache rows.",
)
@json_option
def prune(dry_run: bool, only: str | None, as_json: bool) -> ExitCode:
    """Delete rows kept longer than `[retention]` says, target by target.

    Processed D1 rows go only when every sink of their stream holds their key, checked per
    batch right before the delete; a sink that cannot answer keeps the batch. Resolved dead
    letters, run history (rolled up into daily totals first) and expired cache rows follow.
    Each target's prune is recorded and shown by `sluice status`. Exits 3 when a database
    could not be reached, 1 when a target failed otherwise.

    \b
    Examples:
      sluice prune --dry-run
      sluice prune --only d1 --json
    """
    from sluice.ops.prune import Kind, run_prune

    settings = load_settings()
    if not settings.retention.enabled:
        warn("nothing to prune: every [retention] setting is 0 (keep forever)")
    results = run_prune(settings, only=cast(Kind | None, only), dry_run=dry_run)
    if as_json:
        print_json({"dry_run": dry_run, "targets": [r.as_dict() for r in results]})
    else:
        verb = "would delete" if dry_run else "deleted"
        if results:
            click.echo(f"{'target':<28}{verb:>14}{'kept':>10}{'seconds':>10}  status")
        for r in results:
            click.echo(f"{r.target:<28}{r.deleted:>14}{r.kept:>10}{r.seconds:>10.2f}  {r.status}")
            for note in r.notes:
                click.echo(f"  {note}")
    if any(r.unavailable for r in results):
        return ExitCode.UNAVAILABLE
    if any(r.status != "ok" for r in results):
        return ExitCode.FAILED
    return ExitCode.OK

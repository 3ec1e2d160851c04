"""`sluice config check`: validate the configuration file, and optionally its sources' tables."""

from __future__ import annotations

import os

import click

from sluice.ops.commands.common import ExitCode, load_settings
from sluice.shared.errors import SluiceError
from sluice.shared.settings import D1SourceConfig, KvSourceConfig, Settings


@click.group()
def config() -> None:
    """Check the configuration.

    One TOML file ($SLUICE_CONFIG, else ./sluice.toml) holds the sources, streams, sinks and
    schedules; URLs and secrets come only from the environment (sluice.example.toml documents
    every key).

    \b
    Example:
      sluice config check sluice.example.toml
    """


@config.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--online",
    is_flag=True,
    help="Also open each D1 source and check every configured column against its table.",
)
def check(file: str | None, online: bool) -> ExitCode:
    """Validate the configuration and list its sources.

    Reads FILE (default: $SLUICE_CONFIG, else ./sluice.toml) and names every mistake at once,
    with its key and what was expected, e.g. `sources.usage.batch_size: Input should be
    greater than or equal to 1`. Exits 2 when the file is invalid, and with --online 1 when a
    source's table lacks a configured column.

    \b
    Examples:
      sluice config check
      sluice config check deploy/sluice.toml --online
    """
    if file:
        os.environ["SLUICE_CONFIG"] = file
    s = load_settings()
    where = s.config_path or "<no config file: defaults>"
    click.echo(f"{where}: OK — {len(s.sources)} source(s), {len(s.streams)} stream(s)")
    for name, src in s.sources.items():
        sched = src.schedule.model_dump(exclude_none=True) if src.schedule else "manual"
        kind = (
            f"{src.kind} {src.mode}, {src.capture}" if isinstance(src, D1SourceConfig) else src.kind
        )
        target = ", ".join(src.streams) if isinstance(src, KvSourceConfig) else src.stream
        click.echo(f"  source {name}: {kind} → {target} (schedule: {sched})")
    if s.d1_sink is not None:
        token = "set" if s.secret(s.d1_sink.api_token_env) else "NOT SET"
        click.echo(
            f"  sink d1: database {s.d1_sink.database_id} at {s.d1_sink.base_url}"
            f" (token in ${s.d1_sink.api_token_env}: {token})"
        )
    return check_tables(s) if online else ExitCode.OK


def check_tables(s: Settings) -> ExitCode:
    """Open each D1 source and check its configured columns against its table."""
    from sluice.producers.d1_source import open_d1_source

    failed = 0
    for name, src in s.sources.items():
        if not isinstance(src, D1SourceConfig):
            continue
        try:
            source = open_d1_source(name, src, s)
            try:
                problems = source.check()
            finally:
                source.close()
        except SluiceError as exc:
            problems = [str(exc)]
        failed += bool(problems)
        click.echo(f"  source {name}: " + ("table OK" if not problems else "; ".join(problems)))
    return ExitCode.FAILED if failed else ExitCode.OK

"""`sluice migrate`: apply the pending schema migrations to the sinks and the state store."""

from __future__ import annotations

import click

from sluice.ops.commands.common import ExitCode, load_settings
from sluice.shared.errors import SluiceError
from sluice.shared.settings import SINK_NAMES, Settings


@click.command()
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    type=click.Choice(SINK_NAMES),
    help="Migrate only this sink (repeatable). Default: every sink a stream writes to, the"
    " state store, and the remote D1 sink when [sinks.d1] is configured.",
)
def migrate(sinks: tuple[str, ...]) -> ExitCode:
    """Apply pending schema migrations.

    Runs the files of schema/postgres/ or schema/sqlite/ that a database has not seen yet, each
    once, and prints what was applied; running it again changes nothing. The remote D1 sink
    gets the SQLite files through the Cloudflare API (token from its api_token_env variable).

    \b
    Examples:
      sluice migrate
      CLOUDFLARE_API_TOKEN=… sluice migrate --sink d1
    """
    from sluice.shared.database import postgres_url
    from sluice.shared.migrations import migrate_postgres, migrate_sqlite
    from sluice.shared.state import state_kind

    s = load_settings()
    used = {*s.sinks_fed, state_kind(s), *(["d1"] if s.d1_sink else [])}
    targets = sinks or tuple(t for t in SINK_NAMES if t in used)
    out: dict[str, list[str]] = {}
    if "postgres" in targets:
        out["postgres"] = migrate_postgres(postgres_url(s))
    if "sqlite" in targets:
        out["sqlite"] = migrate_sqlite(s.sqlite_path)
    if "d1" in targets:
        out["d1"] = migrate_d1(s)
    for sink, applied in out.items():
        click.echo(f"{sink}: {'applied ' + ', '.join(applied) if applied else 'up to date'}")
    return ExitCode.OK


def migrate_d1(s: Settings) -> list[str]:
    """Migrate the remote D1 sink through its REST API; the files applied."""
    from sluice.shared.migrations import migrate_d1 as apply
    from sluice.shared.sinks.d1 import D1Sink

    if s.d1_sink is None:
        raise SluiceError("sink 'd1' is not configured: add [sinks.d1] to the config", sink="d1")
    variable = s.d1_sink.api_token_env
    sink = D1Sink(s.d1_sink, lambda: s.secret(variable))
    try:
        return apply(sink.client())
    finally:
        sink.close()

"""The `sluice` command: the root group, and `main`, which runs it and turns errors into one line.

Each command lives in a module of ops/commands/ and is imported only when it runs (or when
`sluice --help` lists them), so a quick command never pays for the others' imports.
"""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
from collections.abc import Sequence

import click

from sluice.ops.commands.common import CommandError, ExitCode
from sluice.ops.commands.failures import explain, one_line

#: Every command, and the module of ops/commands/ that defines it (as an attribute of its name).
COMMANDS = {
    "backfill": "backfill",
    "beat": "pipeline",
    "bench": "bench",
    "config": "config",
    "demo": "demo",
    "dlq": "dlq",
    "flower": "web",
    "migrate": "migrate",
    "produce": "pipeline",
    "prune": "prune",
    "reconcile": "reconcile",
    "runs": "runs",
    "scale": "scale",
    "serve": "web",
    "services": "services",
    "source": "source",
    "status": "status",
    "worker": "pipeline",
}

#: Commands that never use the Celery app: they start without importing it.
WITHOUT_CELERY = frozenset({"config", "services"})


class LazyGroup(click.Group):
    """A group whose commands are imported from their module when first needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"sluice.ops.commands.{module}"), cmd_name)
        assert isinstance(command, click.Command), cmd_name
        return command


def _exit_codes() -> str:
    """The exit codes for the root help (a `\\b` line keeps click from rewrapping them)."""
    lines = [
        textwrap.fill(
            code.meaning, 76, initial_indent=f"{code.value:>5}  ", subsequent_indent=" " * 7
        )
        for code in ExitCode
    ]
    return "\b\nExit codes:\n" + "\n".join(lines)


@click.group(
    cls=LazyGroup,
    epilog=_exit_codes(),
    context_settings={"show_default": True, "max_content_width": 100},
)
@click.version_option(package_name="sluice", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Sluice: queue-based ingestion from D1, Workers KV and HTTP APIs into SQLite and
    PostgreSQL.

    Producers read sources into pages on Redis; workers validate, dedupe and write them to
    the sinks, idempotently; what cannot be written becomes a dead letter. The configuration
    is one TOML file ($SLUICE_CONFIG, else ./sluice.toml); URLs and secrets come from the
    environment (SLUICE_BROKER_URL, SLUICE_POSTGRES_URL, SLUICE_SQLITE_PATH; unset: embedded
    servers in $SLUICE_DATA_DIR). `sluice COMMAND --help` describes each command.

    \b
    Examples:
      sluice demo
      sluice config check && sluice migrate && sluice worker
      sluice status
    """
    if ctx.invoked_subcommand not in WITHOUT_CELERY:
        # Workers and commands acknowledge pages to their sources: the app opens them through
        # the registry, which lives above the app's layer.
        from sluice.producers.registry import open_source
        from sluice.shared.celery_app import app

        app.use_sources(open_source)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `sluice` with these arguments (default: the process's); returns the exit code.

    A mistake the user can act on (a bad option, a SluiceError, a server that does not answer)
    is one line on stderr, `sluice: <what was wrong and what to do>`; only a bug shows a
    traceback."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=args, prog_name="sluice", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        return ExitCode.USAGE
    except click.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        return _fail(ExitCode.USAGE, _sentence(exc.format_message()) + where)
    except CommandError as exc:
        return _fail(exc.code, exc.format_message())
    except click.ClickException as exc:  # click's own, e.g. a file it could not open
        return _fail(ExitCode.USAGE, one_line(exc.format_message()))
    except (click.Abort, KeyboardInterrupt):
        return _fail(ExitCode.INTERRUPTED, "interrupted")
    except Exception as exc:
        failure = explain(exc)
        if failure is None:
            raise
        return _fail(*failure)
    return int(code or 0)


def _fail(code: ExitCode, message: str) -> int:
    click.echo(f"sluice: {message}", err=True)
    return int(code)


def _sentence(message: str) -> str:
    """click's message in our style: one line, lower case first (`Invalid value` → `invalid`)."""
    text = one_line(message).rstrip(".")
    return text[:1].lower() + text[1:]


if __name__ == "__main__":
    sys.exit(main())

"""The `sluice` command documents itself: every command has a description and an example, every
option its help, and the choices an option offers are the code's own lists."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from sluice.ops.cli import COMMANDS, WITHOUT_CELERY, cli, main
from sluice.ops.commands.common import ExitCode

ROOT = Path(__file__).resolve().parents[2]


def walk(
    command: click.Command, path: str = "sluice", parent: click.Context | None = None
) -> Iterator[tuple[str, click.Command, click.Context]]:
    """Every command under `command`, with its full name and a context to render its help."""
    ctx = click.Context(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{path} {name}"
            yield from walk(sub, f"{path} {name}", ctx)


ALL = list(walk(cli))
IDS = [path for path, _, _ in ALL]


def option(path: str, name: str) -> click.Option:
    command = next(c for p, c, _ in ALL if p == path)
    found = [p for p in command.params if isinstance(p, click.Option) and name in p.opts]
    assert len(found) == 1, (path, name)
    return found[0]


def test_the_tree_holds_every_command() -> None:
    assert set(COMMANDS) == {path.split()[1] for path in IDS if path.count(" ") == 1}
    assert {"sluice dlq list", "sluice dlq show", "sluice config check"} <= set(IDS)
    # The root, dlq's seven, config's one, runs' two, source's five, bench's one.
    assert len(IDS) == 1 + len(COMMANDS) + 7 + 1 + 2 + 5 + 1


@pytest.mark.parametrize(("path", "command", "ctx"), ALL, ids=IDS)
def test_every_command_has_a_description_and_an_example(
    path: str, command: click.Command, ctx: click.Context
) -> None:
    text = inspect.cleandoc(command.help or "")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    # A summary line, at least one paragraph that explains, and an example block.
    assert len(paragraphs) >= 3, f"{path}: help needs a summary, a description and an example"
    examples = [p for p in paragraphs if p.strip().startswith("\b\nExample")]
    assert examples, f"{path}: no `Example:` block"
    assert all("  sluice " in p or "sluice " in p for p in examples), path
    assert command.get_short_help_str(), path
    help_text = command.get_help(ctx)
    for param in command.params:
        if isinstance(param, click.Argument):
            # click gives arguments no help of their own: the description must name them.
            assert param.make_metavar(ctx).strip(".[]") in text, f"{path}: {param.name} unnamed"
    assert "Example" in help_text


@pytest.mark.parametrize(("path", "command", "ctx"), ALL, ids=IDS)
def test_every_option_has_help(path: str, command: click.Command, ctx: click.Context) -> None:
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"{path} {param.opts[0]} has no help"


def test_choices_come_from_the_code() -> None:
    from sluice.ops.bench import POOLS, SINKS
    from sluice.ops.dlq import STATUSES
    from sluice.shared.letters import SOURCE_SINK
    from sluice.shared.settings import SINK_NAMES

    def choices(path: str, name: str) -> list[str]:
        kind = option(path, name).type
        assert isinstance(kind, click.Choice), (path, name)
        return list(kind.choices)

    for action in ("list", "replay", "discard"):
        assert choices(f"sluice dlq {action}", "--sink") == [*SINK_NAMES, SOURCE_SINK]
        assert choices(f"sluice dlq {action}", "--status") == [*STATUSES, "all"]
    assert choices("sluice migrate", "--sink") == list(SINK_NAMES)
    assert choices("sluice bench", "--sink") == list(SINKS)
    assert choices("sluice bench", "--pool") == list(POOLS)


def test_common_options_are_declared_once() -> None:
    """--json and --timeout read the same wherever they appear."""
    for name in ("--json", "--timeout"):
        helps = {option(path, name).help for path, command, _ in ALL if name in _opts(command)}
        assert len(helps) == 1, (name, helps)
    assert {p for p, c, _ in ALL if "--json" in _opts(c)} >= {
        "sluice demo",
        "sluice produce",
        "sluice backfill",
        "sluice status",
        "sluice reconcile",
        "sluice scale",
        "sluice bench",
        "sluice dlq list",
    }


def _opts(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts}


def test_the_root_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Exit codes:" in out
    for code in ExitCode:
        assert f"{code.value:>5}  {code.meaning[:30]}" in out


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == ExitCode.USAGE
    assert "Commands:" in capsys.readouterr().out


def test_config_check_does_not_load_celery(tmp_path: Path) -> None:
    """The root group hands Celery the source opener only for commands that use the app, so
    `sluice config check` starts without importing it."""
    assert "config" in WITHOUT_CELERY
    config = tmp_path / "sluice.toml"
    config.write_text("")
    probe = (
        "import sys\n"
        "from sluice.ops.cli import main\n"
        f"code = main(['config', 'check', {str(config)!r}])\n"
        "assert code == 0, code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_other_commands_hand_the_source_opener_to_celery(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sluice.producers.registry import open_source
    from sluice.shared.celery_app import app

    monkeypatch.setattr(app, "_open_source", None)
    monkeypatch.chdir(tmp_path)
    assert main(["scale"]) == ExitCode.USAGE  # stops at its own check, after the root ran
    assert app._open_source is open_source

"""A mistake or an unreachable server is one line on stderr, `sluice: …`, and a named exit code;
never a traceback."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from sqlalchemy import exc as sa

from sluice.ops.cli import main
from sluice.ops.commands.common import ExitCode
from sluice.ops.commands.failures import explain
from sluice.ops.sample import write_d1_file
from sluice.shared.errors import ConfigError, SluiceError, TransientSinkError
from tests.conftest import Env
from tests.helpers import d1_config
from tests.ops.test_cli import sluice

CLOSED = "postgresql://postgres@127.0.0.1:1/sluice"  # nothing listens on port 1


def one_line_failure(run: subprocess.CompletedProcess[str], code: ExitCode) -> str:
    """The run failed with `code` and said why in exactly one line; that line."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("sluice: "), run.stderr
    assert run.returncode == code, (run.returncode, run.stderr)
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_migrate_on_an_unreachable_database(env: Env) -> None:
    env.write_config("")
    run = sluice("migrate", "--sink", "postgres", env=dict(env.vars, SLUICE_POSTGRES_URL=CLOSED))
    line = one_line_failure(run, ExitCode.UNAVAILABLE)
    assert "cannot reach PostgreSQL" in line and "SLUICE_POSTGRES_URL" in line


def test_migrate_on_a_database_that_does_not_exist(env: Env) -> None:
    env.write_config("")
    missing = env.pg_url.rsplit("/", 1)[0] + "/sluice_no_such_database"
    run = sluice("migrate", "--sink", "postgres", env=dict(env.vars, SLUICE_POSTGRES_URL=missing))
    line = one_line_failure(run, ExitCode.UNAVAILABLE)
    assert 'database "sluice_no_such_database" does not exist' in line


def test_migrate_on_a_url_that_is_not_one(env: Env) -> None:
    env.write_config("")
    run = sluice("migrate", "--sink", "postgres", env=dict(env.vars, SLUICE_POSTGRES_URL="pg:x"))
    line = one_line_failure(run, ExitCode.USAGE)
    assert "not a database URL" in line


def test_serve_on_a_busy_port_names_the_address(env: Env, busy_port: int) -> None:
    """It used to end in AttributeError: 'SluiceServer' object has no attribute 'engine'."""
    env.write_config("")
    run = sluice("serve", "--port", str(busy_port), env=env.vars, timeout=60)
    line = one_line_failure(run, ExitCode.UNAVAILABLE)
    assert f"cannot listen on 127.0.0.1:{busy_port}" in line
    assert "Address already in use" in line and "--port" in line


def test_serve_beyond_loopback_without_credentials_is_refused(env: Env) -> None:
    env.write_config("")
    run = sluice("serve", "--host", "0.0.0.0", "--port", "0", env=env.vars, timeout=60)
    line = one_line_failure(run, ExitCode.USAGE)
    assert "without authentication" in line and "SLUICE_CONSOLE_TOKEN" in line


def test_serve_on_a_host_that_does_not_resolve(env: Env) -> None:
    env.write_config("")
    token = dict(env.vars, SLUICE_CONSOLE_TOKEN="t" * 32)
    run = sluice("serve", "--host", "no-such-host.invalid", "--port", "0", env=token, timeout=60)
    line = one_line_failure(run, ExitCode.UNAVAILABLE)
    assert "cannot listen on no-such-host.invalid:0" in line
    assert "t" * 32 not in run.stderr + run.stdout


def test_a_missing_config_file(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sluice.toml"
    run = sluice("produce", "usage", env=dict(env.vars, SLUICE_CONFIG=str(missing)))
    line = one_line_failure(run, ExitCode.USAGE)
    assert line == f"sluice: invalid configuration in {missing}: file not found: {missing}"


def test_an_invalid_config_is_one_line_naming_every_key(env: Env) -> None:
    env.write_config(
        "[pipeline]\npage_size = 0\n[sources.u]\nkind = 'd1'\nstream = 'nope'\npath = 'x'\n"
    )
    line = one_line_failure(sluice("status", env=env.vars), ExitCode.USAGE)
    assert "pipeline.page_size: " in line and "sources.u.stream: " in line


@pytest.mark.parametrize(
    "args",
    [
        ["produce", "nosuch"],
        ["reconcile", "nosuch"],
        ["backfill", "nosuch", "--from", "2024-01-01", "--to", "2024-01-02"],
    ],
    ids=["produce", "reconcile", "backfill"],
)
def test_an_unknown_source_names_the_known_ones(env: Env, args: list[str]) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(d1_config(d1))
    line = one_line_failure(sluice(*args, env=env.vars), ExitCode.USAGE)
    assert "unknown source 'nosuch' (known: d1_usage)" in line


def test_a_bad_since_is_refused_before_any_database_is_opened(env: Env) -> None:
    env.write_config("")
    vars_ = dict(env.vars, SLUICE_POSTGRES_URL=CLOSED)  # would be "unavailable" if reached
    line = one_line_failure(
        sluice("dlq", "list", "--since", "yesterday", env=vars_), ExitCode.USAGE
    )
    assert "invalid value for '--since'" in line and "'yesterday'" in line
    assert "sluice dlq list --help" in line


@pytest.mark.parametrize(
    "args",
    [
        ["backfill", "bn", "--from", "last tuesday", "--to", "2024-01-02"],
        ["dlq", "list", "--status", "lost"],
        ["scale", "--grow", "1", "--shrink", "1"],
        ["reconcile", "bot", "--sample", "-1"],
        ["nosuch"],
    ],
    ids=["from", "status", "scale", "sample", "command"],
)
def test_a_bad_command_line_is_one_line_and_exit_2(env: Env, args: list[str]) -> None:
    env.write_config("")
    line = one_line_failure(sluice(*args, env=env.vars), ExitCode.USAGE)
    assert "--help`)" in line


def test_an_unreachable_redis(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 10)
    env.write_config(d1_config(d1))
    run = sluice(
        "produce", "d1_usage", env=dict(env.vars, SLUICE_BROKER_URL="redis://127.0.0.1:1/0")
    )
    line = one_line_failure(run, ExitCode.UNAVAILABLE)
    assert line.startswith("sluice: cannot reach Redis: ") and "SLUICE_BROKER_URL" in line


# -- in-process: what each kind of error becomes --------------------------------------------------


def test_explain_names_an_exit_code_for_what_the_user_can_act_on() -> None:
    pg_down = psycopg2.OperationalError("connection to server failed\n\tIs the server running?")
    cases: list[tuple[BaseException, ExitCode, str]] = [
        (SluiceError("unknown source 'x'", source="x"), ExitCode.USAGE, "(source=x)"),
        (TransientSinkError("database is busy"), ExitCode.UNAVAILABLE, "busy"),
        (ConfigError(["a: bad", "b: worse"], "f.toml"), ExitCode.USAGE, "f.toml: a: bad; b: worse"),
        (redis.ConnectionError("Error 111"), ExitCode.UNAVAILABLE, "cannot reach Redis"),
        (sa.OperationalError("SELECT 1", {}, pg_down), ExitCode.UNAVAILABLE, "failed Is the"),
        (
            sa.ProgrammingError("SELECT", {}, sqlite3.OperationalError("no such table: x")),
            ExitCode.USAGE,
            "sluice migrate",
        ),
        (OSError(98, "Address already in use"), ExitCode.UNAVAILABLE, "choose another port"),
        (
            ConnectionError("GET https://api.example/x?api_key=SECRET failed"),
            ExitCode.UNAVAILABLE,
            "?…",
        ),
    ]
    for exc, code, part in cases:
        got = explain(exc)
        assert got is not None, exc
        assert got[0] == code and part in got[1] and "\n" not in got[1], (exc, got)
        assert "SECRET" not in got[1]


def test_a_bug_keeps_its_traceback_but_a_cause_is_found() -> None:
    assert explain(ValueError("a bug")) is None
    assert explain(sa.ProgrammingError("SELECT", {}, psycopg2.ProgrammingError("syntax"))) is None
    try:
        try:
            raise redis.ConnectionError("Error 111")
        except redis.ConnectionError as exc:
            raise RuntimeError("lost the broker") from exc
    except RuntimeError as wrapped:
        got = explain(wrapped)
    assert got is not None and got[0] == ExitCode.UNAVAILABLE


def test_ctrl_c_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sluice.ops.commands import services

    def interrupted(_data_dir: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(services.ACTIONS, "status", interrupted)
    assert main(["services", "status"]) == ExitCode.INTERRUPTED == 130
    assert capsys.readouterr().err.strip().endswith("sluice: interrupted")

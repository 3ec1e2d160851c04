"""Settings: the TOML file and the environment, as an operator writes and checks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sluice.shared.errors import ConfigError, UnknownStreamError
from sluice.shared.settings import D1SourceConfig, KvSourceConfig, Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "sluice.example.toml"

LOCAL_SOURCE = """
[sources.x]
kind = "d1"
stream = "usage_events"
path = "d1.sqlite"
"""


def load(path: Path, **env: str) -> Settings:
    return Settings.load({"SLUICE_CONFIG": str(path), **env})


def config_check(path: Path) -> subprocess.CompletedProcess[str]:
    """`sluice config check FILE` as a user runs it (no SLUICE_* variables leaking in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run(
        [sys.executable, "-m", "sluice.ops.cli", "config", "check", str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(path) in str(info.value), "the message names the file"
    return info.value.problems


# --- the example file ----------------------------------------------------------------------------


def test_example_config_loads() -> None:
    s = load(EXAMPLE)
    assert s.config_path == EXAMPLE
    kinds = {name: cfg.kind for name, cfg in s.sources.items()}
    assert kinds == {
        "usage_local": "d1",
        "usage_remote": "d1",
        "binance": "binance",
        "cryptocompare": "cryptocompare",
        "coingecko": "coingecko",
        "aceiot": "aceiot",
        "bot_kv": "kv",
    }
    kv = s.sources["bot_kv"]
    assert isinstance(kv, KvSourceConfig)
    assert kv.streams == ["users", "cache", "watchlists", "executions", "active_positions"]
    assert [k.pattern for k in kv.keys][:2] == ["chat_ids", "watchlist:{chatId}"]
    assert kv.once and kv.mode == "remote"
    local, remote = s.sources["usage_local"], s.sources["usage_remote"]
    assert isinstance(local, D1SourceConfig) and isinstance(remote, D1SourceConfig)
    assert (local.mode, local.stream, local.batch_size, local.max_batches) == (
        "local",
        "usage_events",
        1000,
        10,
    )
    assert local.path == str(ROOT / "d1" / "usage.sqlite")
    assert local.schedule is not None and local.schedule.every == 300
    assert remote.mode == "remote"
    assert remote.account_id == "023e105f4ecef8ad9ca31a8372d0c353"
    assert remote.schedule is not None and remote.schedule.cron == "*/5 * * * *"
    assert s.pipeline.page_size == 1000
    assert s.pipeline.inflight_lease == 14400
    assert s.stream("usage_events").sinks == ("postgres", "sqlite")
    assert s.stream("usage_events").conflict == "ignore"


def test_config_check_accepts_the_example_and_lists_both_sources() -> None:
    r = config_check(EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert "7 source(s)" in r.stdout
    for name in (
        "usage_local",
        "usage_remote",
        "binance",
        "cryptocompare",
        "coingecko",
        "aceiot",
        "bot_kv",
    ):
        assert f"source {name}:" in r.stdout


# --- mistakes, each named with its key and what was expected -------------------------------------

MISTAKES = [
    pytest.param(
        LOCAL_SOURCE + "batch_szie = 10\n",
        "sources.x.batch_szie",
        "Extra inputs are not permitted",
        id="typo-in-key",
    ),
    pytest.param(
        LOCAL_SOURCE + 'batch_size = "ten"\n',
        "sources.x.batch_size",
        ("valid integer", "(got 'ten')"),
        id="wrong-type",
    ),
    pytest.param(
        LOCAL_SOURCE + 'batch_size = "10"\n',
        "sources.x.batch_size",
        ("valid integer", "(got '10')"),
        id="number-as-string",
    ),
    pytest.param(
        LOCAL_SOURCE + "batch_size = true\n",
        "sources.x.batch_size",
        ("valid integer", "(got True)"),
        id="bool-for-number",
    ),
    pytest.param(
        LOCAL_SOURCE + "batch_size = 0\n",
        "sources.x.batch_size",
        "greater than or equal to 1 (got 0)",
        id="below-range",
    ),
    pytest.param(
        LOCAL_SOURCE + "batch_size = 100001\n",
        "sources.x.batch_size",
        "less than or equal to 100000",
        id="above-range",
    ),
    pytest.param(
        '[sources.x]\nkind = "kv"\npath = "kv.json"\nmode = "local"\n'
        'keys = [{ pattern = "p:{chatId}", stream = "usage_events" }]\n',
        "sources.x.keys.0",
        "stream 'usage_events' has no KV mapper (expected one of: users, watchlists,",
        id="kv-stream-without-mapper",
    ),
    pytest.param(
        '[sources.x]\nkind = "kv"\naccount_id = "a"\nnamespace_id = "n"\n'
        'keys = [{ pattern = "watchlist", stream = "watchlists" }]\n',
        "sources.x.keys.0",
        "pattern for watchlists must contain {chatId}",
        id="kv-child-pattern-without-chat-id",
    ),
    pytest.param(
        '[sources.x]\nkind = "kv"\nmode = "remote"\naccount_id = "a"\n',
        "sources.x",
        "remote mode needs 'account_id' and 'namespace_id'",
        id="kv-remote-without-namespace",
    ),
    pytest.param(
        LOCAL_SOURCE.replace('"usage_events"', '"usage_evnts"'),
        "sources.x.stream",
        "unknown stream 'usage_evnts'"
        " (expected one of: active_positions, cache, executions, historical_prices,"
        " scheduled_job_results, timeseries, usage_events, users, watchlists)",
        id="unknown-stream-for-source",
    ),
    pytest.param(
        "[streams.orders]\nsinks = ['sqlite']\n",
        "streams.orders",
        "unknown stream (expected one of: active_positions, cache, executions, historical_prices,"
        " scheduled_job_results, timeseries, usage_events, users, watchlists)",
        id="unknown-stream-section",
    ),
    pytest.param(
        "[streams.usage_events]\nsinks = ['mysql']\n",
        "streams.usage_events.sinks.0",
        "'postgres', 'sqlite' or 'd1' (got 'mysql')",
        id="unknown-sink",
    ),
    pytest.param(
        "[streams.usage_events]\nconflict = 'newest'\n",
        "streams.usage_events.conflict",
        "'ignore', 'update' or 'newer'",
        id="unknown-conflict-policy",
    ),
    pytest.param(
        "[streams.usage_events]\nconflict = 'newer'\n",
        "streams.usage_events.conflict",
        "'newer' needs a version column",
        id="newer-without-version-column",
    ),
    pytest.param(
        '[sources.x]\nkind = "d1"\nstream = "usage_events"\nmode = "remote"\ndatabase_id = "db"\n',
        "sources.x",
        "remote mode needs 'account_id'",
        id="remote-without-account-id",
    ),
    pytest.param(
        '[sources.x]\nkind = "d1"\nstream = "usage_events"\n',
        "sources.x",
        "local mode needs 'path'",
        id="local-without-path",
    ),
    pytest.param(
        '[sources.x]\nstream = "usage_events"\npath = "d1.sqlite"\n',
        "sources.x.kind",
        "Field required",
        id="missing-kind",
    ),
    pytest.param(
        LOCAL_SOURCE + 'schedule = { every = 60, cron = "* * * * *" }\n',
        "sources.x.schedule",
        "set exactly one of 'every' (seconds) or 'cron'",
        id="schedule-every-and-cron",
    ),
    pytest.param(
        LOCAL_SOURCE + "schedule = {}\n",
        "sources.x.schedule",
        "set exactly one of 'every' (seconds) or 'cron'",
        id="schedule-empty",
    ),
    pytest.param(
        LOCAL_SOURCE + 'schedule = { cron = "*/5 * * *" }\n',
        "sources.x.schedule",
        "cron must have 5 fields",
        id="cron-with-4-fields",
    ),
    pytest.param(
        LOCAL_SOURCE + "schedule = { every = 0 }\n",
        "sources.x.schedule.every",
        "greater than 0",
        id="schedule-every-zero",
    ),
    pytest.param(
        "[pipeline]\npage_size = -1\n",
        "pipeline.page_size",
        "greater than or equal to 1 (got -1)",
        id="pipeline-out-of-range",
    ),
    pytest.param(
        "[pipelin]\npage_size = 10\n",
        "pipelin",
        "Extra inputs are not permitted",
        id="unknown-top-level-section",
    ),
]


@pytest.mark.parametrize(("text", "key", "expected"), MISTAKES)
def test_each_mistake_is_named_with_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str | tuple[str, ...]
) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: "), problems
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in problems[0], problems


BROKEN = """
[pipeline]
page_size = 0

[streams.orders]
sinks = ["sqlite"]

[sources.typo]
kind = "d1"
stream = "usage_events"
path = "d1.sqlite"
batch_szie = 10

[sources.wrong_type]
kind = "d1"
stream = "usage_events"
path = "d1.sqlite"
batch_size = "ten"

[sources.no_such_stream]
kind = "d1"
stream = "nope"
path = "d1.sqlite"

[sources.remote]
kind = "d1"
stream = "usage_events"
mode = "remote"
database_id = "db"

[sources.bad_cron]
kind = "d1"
stream = "usage_events"
path = "d1.sqlite"
schedule = { cron = "* * * *" }
"""

BROKEN_KEYS = [
    "pipeline.page_size: ",
    "streams.orders: ",
    "sources.typo.batch_szie: ",
    "sources.wrong_type.batch_size: ",
    "sources.no_such_stream.stream: ",
    "sources.remote: ",
    "sources.bad_cron.schedule: ",
]


def test_every_mistake_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    problems = problems_of(path)
    for key in BROKEN_KEYS:
        assert sum(p.startswith(key) for p in problems) == 1, (key, problems)
    assert len(problems) == len(BROKEN_KEYS), problems


def test_config_check_reports_every_mistake_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    r = config_check(path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"sluice: invalid configuration in {path}")
    for key in BROKEN_KEYS:
        assert key in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[pipeline]\npage_size = 10\n[sources.x\nkind = "d1"\n')
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith("not valid TOML: ")
    assert "line 3" in problems[0]
    r = config_check(path)
    assert r.returncode == 2
    assert str(path) in r.stderr
    assert "not valid TOML" in r.stderr


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "sluice.toml"
    assert problems_of(path) == [f"file not found: {path}"]
    r = config_check(path)
    assert r.returncode == 2
    assert r.stderr.startswith("sluice: ")
    assert str(path) in r.stderr
    assert "Traceback" not in r.stderr


# --- URLs and paths from the environment ---------------------------------------------------------


def test_unset_urls_mean_embedded_servers_in_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.load({})  # no SLUICE_CONFIG and no ./sluice.toml: defaults
    assert s.config_path is None
    assert s.broker_url is None
    assert s.postgres_url is None
    assert s.data_dir == tmp_path.resolve() / ".sluice"
    assert s.sqlite_path == s.data_dir / "sluice.sqlite"
    assert s.sources == {}
    assert s.stream("usage_events").sinks == ("postgres", "sqlite")


def test_empty_url_variables_also_mean_embedded(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("")
    s = load(path, SLUICE_BROKER_URL="", SLUICE_POSTGRES_URL="", SLUICE_SQLITE_PATH="")
    assert s.broker_url is None
    assert s.postgres_url is None
    assert s.sqlite_path == s.data_dir / "sluice.sqlite"


def test_urls_and_paths_set_in_the_environment_are_used(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("[pipeline]\ndata_dir = 'from-toml'\n")
    s = load(
        path,
        SLUICE_BROKER_URL="redis://queue.internal:6379/3",
        SLUICE_POSTGRES_URL="postgresql://sluice@db.internal:5432/sluice",
        SLUICE_SQLITE_PATH=str(tmp_path / "elsewhere" / "sink.sqlite"),
        SLUICE_DATA_DIR=str(tmp_path / "data"),
    )
    assert s.broker_url == "redis://queue.internal:6379/3"
    assert s.postgres_url == "postgresql://sluice@db.internal:5432/sluice"
    assert s.sqlite_path == (tmp_path / "elsewhere" / "sink.sqlite").resolve()
    assert s.data_dir == (tmp_path / "data").resolve()  # the environment wins over the file


def test_sqlite_path_defaults_to_the_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("")
    s = load(path, SLUICE_DATA_DIR=str(tmp_path / "state"))
    assert s.sqlite_path == (tmp_path / "state" / "sluice.sqlite").resolve()


def test_data_dir_in_the_file_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    path = conf / "sluice.toml"
    path.write_text("[pipeline]\ndata_dir = 'state'\n")
    s = load(path)
    assert s.data_dir == (conf / "state").resolve()
    assert s.sqlite_path == (conf / "state" / "sluice.sqlite").resolve()


def test_relative_source_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    absolute = tmp_path / "abs" / "d1.sqlite"
    path = conf / "sluice.toml"
    path.write_text(
        f"""
[sources.rel]
kind = "d1"
stream = "usage_events"
path = "d1/usage.sqlite"

[sources.abs]
kind = "d1"
stream = "usage_events"
path = "{absolute}"

[sources.state]
kind = "d1"
stream = "usage_events"
wrangler_state = ".wrangler/state"
database_id = "11111111-2222-3333-4444-555555555555"
"""
    )
    s = load(path)
    assert s.sources["rel"].path == str((conf / "d1" / "usage.sqlite").resolve())
    assert s.sources["abs"].path == str(absolute)
    assert s.sources["state"].wrangler_state == str((conf / ".wrangler" / "state").resolve())


def test_sluice_toml_in_the_working_folder_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sluice.toml").write_text(LOCAL_SOURCE)
    s = Settings.load({})
    assert s.config_path == Path("sluice.toml")
    assert s.sources["x"].path == str((tmp_path / "d1.sqlite").resolve())


# --- streams -------------------------------------------------------------------------------------


def test_unknown_stream_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("")
    s = load(path)
    with pytest.raises(UnknownStreamError) as info:
        s.stream("nope")
    assert "'nope'" in str(info.value)
    assert "usage_events" in str(info.value), "the message lists the known streams"
    assert info.value.context["stream"] == "nope"


def test_stream_sinks_and_conflict_come_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text("[streams.usage_events]\nsinks = ['sqlite']\nconflict = 'update'\n")
    stream = load(path).stream("usage_events")
    assert stream.sinks == ("sqlite",)
    assert stream.conflict == "update"
    assert stream.key == ("idempotency_key",)  # the rest is the catalog's


def test_stream_defaults_without_a_section(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(LOCAL_SOURCE)
    stream = load(path).stream("usage_events")
    assert stream.sinks == ("postgres", "sqlite")
    assert stream.conflict == "ignore"


# --- secrets -------------------------------------------------------------------------------------

REMOTE = """
[sources.remote]
kind = "d1"
stream = "usage_events"
mode = "remote"
account_id = "acc"
database_id = "db"
api_token_env = "MY_D1_TOKEN"
"""


def test_secret_is_read_from_the_named_variable_and_never_shown(tmp_path: Path) -> None:
    token = "tok-3f9a1c7e5b2d4a68-very-secret"
    path = tmp_path / "sluice.toml"
    path.write_text(REMOTE)
    s = load(path, MY_D1_TOKEN=token, CLOUDFLARE_API_TOKEN="other-token")
    src = s.sources["remote"]
    assert src.api_token_env == "MY_D1_TOKEN"
    assert s.secret(src.api_token_env) == token
    assert token not in repr(s)
    assert token not in str(s)
    assert "other-token" not in repr(s)


def test_missing_or_empty_secret_is_none(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(REMOTE)
    assert load(path).secret("MY_D1_TOKEN") is None
    assert load(path, MY_D1_TOKEN="").secret("MY_D1_TOKEN") is None


def test_default_token_variable_is_cloudflare_api_token(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(REMOTE.replace('api_token_env = "MY_D1_TOKEN"\n', ""))
    s = load(path, CLOUDFLARE_API_TOKEN="cf-token")
    assert s.sources["remote"].api_token_env == "CLOUDFLARE_API_TOKEN"
    assert s.secret(s.sources["remote"].api_token_env) == "cf-token"

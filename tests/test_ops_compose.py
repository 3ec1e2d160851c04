"""docker-compose.yml: every service built from our image runs a valid `sluice` command, and no
secret is written in the file. (`docker compose config` needs an engine; parsing is enough here.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from sluice.ops.cli import cli

ROOT = Path(__file__).resolve().parent.parent
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

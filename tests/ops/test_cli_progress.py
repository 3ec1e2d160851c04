"""Long commands show progress on stderr: a bar on a terminal, plain lines when piped."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from sluice.ops.commands.progress import Progress
from tests.conftest import Env
from tests.ops.test_cli import sluice


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_with_counts_rate_and_time_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("sluice.ops.commands.progress.time.monotonic", lambda: next(clock))
    out = Terminal()
    with Progress("backfill bn", "windows", stream=out) as p:
        p.advance(10, 100, "bn: window 10/100 (BTCUSDT …)")  # resumed: 10 done before
        p.advance(30, 100, "bn: window 30/100 (BTCUSDT …)")
        p.say("bn: NOSUCHCOIN failed (the other partitions go on)")
        p.advance(50, 100, "")
    text = out.getvalue()
    assert "backfill bn" in text and "[" in text and "#" in text
    assert "30/100" in text and "30%" in text and "50/100" in text
    # 20 windows in the first 2 s of this run (the 10 resumed ones do not count): 10/s.
    assert re.search(r"\d+(\.\d)? windows/s, \ds left", text), text
    # The message is printed on its own line, the bar drawn again below it.
    assert "\r\x1b[Kbn: NOSUCHCOIN failed (the other partitions go on)\n\r" in text
    assert "window 30/100 (BTCUSDT" not in text  # the bar replaces the per-window lines
    assert text.endswith("\n")


def test_piped_plain_lines_at_most_every_interval_and_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr("sluice.ops.commands.progress.time.monotonic", lambda: now[0])
    out = io.StringIO()
    p = Progress("demo", "records", stream=out, interval=2.0)
    p.advance(0, 1000)  # the starting point: nothing to say yet
    for t, done in ((1.0, 100), (1.5, 200), (2.0, 300), (4.0, 600), (4.5, 1000)):
        now[0] = t
        p.advance(done, 1000)
    p.say("every record read")
    lines = out.getvalue().splitlines()
    assert lines == [
        "demo: 100/1,000 records (10%), 100 records/s, 9s left",
        "demo: 600/1,000 records (60%), 150 records/s, 3s left",
        "demo: 1,000/1,000 records (100%), 222 records/s",
        "every record read",
    ]
    # A line of detail (a backfill's window) is printed as it is, every time.
    p.advance(1, 2, "bn: window 1/2 (BTCUSDT …)")
    assert out.getvalue().splitlines()[-1] == "bn: window 1/2 (BTCUSDT …)"


def test_work_without_counts_says_what_and_for_how_long() -> None:
    """reconcile reports nothing as it goes: on a terminal its time so far, redrawn."""
    out = Terminal()
    with Progress("reconcile bot", "keys", stream=out).working("reading"):
        time.sleep(1.2)
    text = out.getvalue()
    assert "\r\x1b[Kreconcile bot: reading 0s" in text and "reading 1s" in text
    assert text.endswith("\r\x1b[K")  # the line is cleared for the result
    piped = io.StringIO()
    with Progress("reconcile bot", "keys", stream=piped).working("reading"):
        pass
    assert piped.getvalue() == "reconcile bot: reading\n"


def test_quiet_says_nothing() -> None:
    out = Terminal()
    p = Progress("bench postgres", "steps", quiet=True, stream=out)
    p.advance(1, 4, "run 1: limit 100 rows/s")
    p.say("prefilling")
    p.close()
    assert out.getvalue() == ""


def test_demo_reports_progress_between_its_first_line_and_its_summary(
    env: Env, tmp_path: Path
) -> None:
    """Piped, as a log or CI sees it: lines of records committed, with their rate, before the
    summary."""
    run = sluice(
        "demo", "--records", "3000", "--page-size", "100", "--workers", "1",
        "--data-dir", str(tmp_path / "demo"),
        env=env.vars, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0].startswith("sample D1 file: 3000 usage events")
    progress = [
        line
        for line in lines
        if re.fullmatch(
            r"demo, committed: [\d,]+/3,000 records \(\d+%\), [\d,.]+ records/s(, .+ left)?", line
        )
    ]
    assert progress, run.stderr
    assert progress[-1].startswith("demo, committed: 3,000/3,000 records (100%)")
    assert "records/s" in run.stdout and "pipeline" in run.stdout


def test_demo_json_keeps_stderr_free_of_progress(env: Env, tmp_path: Path) -> None:
    run = sluice(
        "demo", "--records", "2000", "--workers", "1", "--json",
        "--data-dir", str(tmp_path / "demo"),
        env=env.vars, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "committed:" not in run.stderr and "sample D1 file" not in run.stderr
    assert set(__import__("json").loads(run.stdout)) == {
        "fetched",
        "inserted",
        "duplicates",
        "dead_letters",
        "seconds",
        "records_per_second",
        "sinks",
        "data",
    }

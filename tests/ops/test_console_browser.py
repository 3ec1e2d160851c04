"""The console as an operator uses it, in a real headless Chromium (Debian's `chromium`, driven
by Playwright), against `sluice serve`, real Celery workers, PostgreSQL, Redis and the SQLite
sink: log in; see dead letters grouped by class; filter by one class; the dry run counts what a
replay would queue; replay them and see the records land in both sinks; discard a filtered set;
a payload with markup shows as text; a POST without the CSRF token is refused; pause a source and
see `sluice produce` skip it; run a source now and follow its run to the end.

The screenshots in ops/docs/console-*.png (shown in ops/README.md) are taken here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sluice.ops.sample import COLUMNS, generate_rows, write_d1_file
from sluice.ops.workers import WorkerPool
from sluice.shared.letters import DeadLetter, record_of_row, write_letters
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from sluice.shared.state import open_state
from tests.conftest import Env
from tests.helpers import d1_config, d1_processed, pg_keys, sqlite_keys
from tests.ops.test_cli import ROOT, sluice

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "console-test-token-" + "k" * 24
DOCS = ROOT / "ops" / "docs"
MARKUP = '<script>alert("owned")</script><b onmouseover=alert(1)>bold</b>'
QUEUES = ["ingest.postgres", "ingest.sqlite", "dead_letter", "progress", "produce"]


@contextmanager
def served(env: Env) -> Iterator[str]:
    """`sluice serve` on a free port, with a token; its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.ops.cli", "serve", "--port", "0"],
        env=dict(env.vars, SLUICE_CONSOLE_TOKEN=TOKEN),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("sluice serve: http://"), (line, proc.stderr and proc.stderr.read())
        yield line.split()[2].rstrip("/")
    finally:
        proc.terminate()
        proc.wait(20)


def letters(settings: Settings) -> tuple[list[str], int]:
    """Dead letters as an outage leaves them: 6 valid records refused by both sinks
    (OperationalError, 12 letters); 3 of another class to discard; one whose key and values
    hold markup. The 6 records' keys, and the number of letters written."""
    rows, _, _ = generate_rows(40, seed=7)
    valid = [list(r) for r in rows if str(r[3]).startswith("idem_") and "bad" not in str(r[3])]
    outage = valid[:6]
    out: list[DeadLetter] = []
    for sink in ("postgres", "sqlite"):
        for r in outage:
            out.append(letter(sink, r, "OperationalError", "server closed the connection"))
    for r in valid[6:9]:
        out.append(letter("postgres", r, "SchemaMismatch", "column metric_unit does not exist"))
    marked = list(valid[9])
    marked[4] = MARKUP
    out.append(letter("sqlite", marked, "ValidationError", f"metric: not a metric: {MARKUP}"))
    store = open_state(settings)
    try:
        write_letters(store, out)
    finally:
        store.dispose()
    return [str(r[3]) for r in outage], len(out)


def letter(sink: str, row: list[object], cls: str, message: str) -> DeadLetter:
    key = str(row[3]) if cls != "ValidationError" else f"{row[3]}{MARKUP}"
    return DeadLetter(
        stream="usage_events",
        sink=sink,
        source="d1_usage",
        page_id=f"page-{cls}",
        record_key=key,
        record=record_of_row(COLUMNS, row),
        error_class=cls,
        error_message=message,
    )


def shot(page: object, name: str) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS / f"console-{name}.png"), full_page=True)  # type: ignore[attr-defined]


def wait_for(check: object, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_an_operator_works_the_console_in_chromium(env: Env) -> None:
    from playwright.sync_api import expect, sync_playwright

    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 1_000)
    # An HTTP API source beside it, never run here: the sources page then offers a cursor
    # reset and a backfill (its screenshot shows them).
    env.write_config(
        d1_config(d1, page_size=250)
        + '\n[sources.bn]\nkind = "binance"\nsymbols = ["BTCUSDT"]\nbase_url = "http://127.0.0.1:9"\n'
    )
    migrate_sqlite(env.sqlite_path)
    settings = Settings.load(env.vars)
    replayed_keys, _ = letters(settings)
    dialogs: list[str] = []

    with (
        served(env) as url,
        WorkerPool(env.vars, env.dir / "logs") as workers,
        sync_playwright() as pw,
    ):
        workers.start("all", QUEUES, 2)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        # Log in: the console sends an unauthenticated visitor to the login form.
        page.goto(url + "/letters")
        assert "/login" in page.url
        page.fill("input[name=token]", "wrong")
        page.click("button:has-text('Log in')")
        expect(page.locator(".problem")).to_contain_text("not valid")
        page.fill("input[name=token]", TOKEN)
        page.click("button:has-text('Log in')")
        page.wait_for_url(url + "/letters")

        # Dead letters grouped by class, with their counts.
        groups = page.locator("table.groups tbody tr")
        expect(groups).to_have_count(3)
        counts = {
            groups.nth(i).locator("td").nth(0).inner_text(): groups.nth(i)
            .locator("td")
            .nth(1)
            .inner_text()
            for i in range(3)
        }
        assert counts == {"OperationalError": "12", "SchemaMismatch": "3", "ValidationError": "1"}
        shot(page, "dead-letters")

        # Filter by one class: only its letters are listed.
        page.click("table.groups a:has-text('OperationalError')")
        expect(page.locator("table.letters tbody tr")).to_have_count(12)
        for text in page.locator("table.letters tbody tr td:nth-child(6) strong").all_inner_texts():
            assert text == "OperationalError"

        # The dry run counts what a replay would queue; nothing changes until confirmed.
        page.click("button:has-text('Replay all selected')")
        expect(page.locator("#dry-run-count")).to_have_attribute("data-count", "12")
        expect(page.locator("#dry-run-count")).to_contain_text("12 record(s) would be queued")
        page.click("button:has-text('Yes, replay 12')")
        expect(page.locator(".notice")).to_contain_text("Replayed 12 dead letter(s)")
        expect(page.locator("table.groups tbody tr")).to_have_count(1)  # none pending of it
        expect(page.locator("table.groups")).to_contain_text("No dead letters match")
        # The workers write the replayed records to both sinks.
        wait_for(
            lambda: (
                set(replayed_keys) <= set(pg_keys(env.pg_url))
                and set(replayed_keys) <= set(sqlite_keys(env.sqlite_path))
            ),
            "the replayed records in PostgreSQL and SQLite",
        )
        page.goto(url + "/letters")
        expect(page.locator("table.groups tbody tr")).to_have_count(2)

        # Discard a filtered set, typed into the filter form.
        page.fill("input[name=error_class]", "SchemaMismatch")
        page.click("button:has-text('Filter')")
        expect(page.locator("table.letters tbody tr")).to_have_count(3)
        page.click("button:has-text('Discard all selected')")
        expect(page.locator("#dry-run-count")).to_have_attribute("data-count", "3")
        page.click("button:has-text('Yes, discard 3')")
        expect(page.locator(".notice")).to_contain_text("Discarded 3 dead letter(s)")
        page.select_option("select[name=status]", "discarded")
        page.fill("input[name=error_class]", "")
        page.click("button:has-text('Filter')")
        expect(page.locator("table.letters tbody tr")).to_have_count(3)

        # A payload with markup shows as text: no script ran, no element was made of it.
        page.goto(url + "/letters?error_class=ValidationError")
        page.click("table.letters tbody tr a")
        expect(page.locator("#payload")).to_contain_text("<script>alert(")
        expect(page.locator("#payload")).to_contain_text("<b onmouseover=alert(1)>bold</b>")
        expect(page.locator("#error")).to_contain_text("<b onmouseover=alert(1)>bold</b>")
        assert page.locator("main script, main b[onmouseover]").count() == 0
        assert page.evaluate("document.scripts.length") == 1  # the console's own file
        page.hover("#payload")
        assert dialogs == []
        shot(page, "letter")

        # A POST without the CSRF token is refused, even with the session cookie.
        refused = page.request.post(url + "/sources/d1_usage/pause", form={"reason": "x"})
        assert refused.status == 403
        page.goto(url + "/sources")
        expect(page.locator("#source-d1_usage")).to_contain_text("active")

        # Pause a source: `sluice produce` then skips it, and says why.
        page.fill("#source-d1_usage input[name=reason]", "disk full on the D1 host")
        page.click("#source-d1_usage button:has-text('Pause')")
        expect(page.locator(".notice")).to_contain_text("Paused d1_usage")
        expect(page.locator("#source-d1_usage")).to_contain_text("paused")
        skipped = sluice("produce", "d1_usage", "--json", env=env.vars, timeout=120)
        doc = json.loads(skipped.stdout)
        assert doc["status"] == "skipped" and "disk full on the D1 host" in doc["error"]
        assert d1_processed(d1)[1] == 0

        # Resume, run it now, and follow the run to its end.
        page.click("#source-d1_usage button:has-text('Resume')")
        expect(page.locator(".notice")).to_contain_text("Resumed d1_usage")
        page.click("#source-d1_usage button:has-text('Run now')")
        page.wait_for_url(url + "/runs/*")
        run_id = page.url.rsplit("/", 1)[1]
        expect(page.locator("h1")).to_contain_text(run_id)
        expect(page.locator("#run-status")).to_have_text("ok", timeout=90_000)
        expect(page.locator("#run-records")).not_to_have_text("0")
        wait_for(lambda: d1_processed(d1)[1] > 0, "the run's pages to be committed")
        page.reload()
        shot(page, "run")

        page.goto(url + "/runs")
        expect(page.locator("table.runs")).to_contain_text(run_id[:12])
        shot(page, "runs")
        page.goto(url + "/sources")
        shot(page, "sources")
        page.goto(url + "/")
        expect(page.locator("h1")).to_have_text("Overview")
        expect(page.locator("body")).to_contain_text("d1_usage")
        shot(page, "overview")
        browser.close()
    assert os.path.getsize(DOCS / "console-overview.png") > 10_000

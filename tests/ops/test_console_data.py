"""The console's data layer on both state stores (PostgreSQL, and the SQLite file when there is
no PostgreSQL): dead letters paged, filtered, counted, grouped and discarded; run history paged
and filtered; sources paused. Real databases, migrated as `sluice migrate` does."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from sluice.ops import dlq, runs
from sluice.shared.controls import paused, set_paused
from sluice.shared.database import postgres_engine
from sluice.shared.letters import DeadLetter, record_of_row, write_letters
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.state import StateStore, sqlite_engine
from tests.conftest import Env
from tests.ops.test_cli import sluice

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "postgres":
        s = StateStore(postgres_engine(request.getfixturevalue("pg_url")))
    else:
        path = tmp_path / "state.sqlite"
        migrate_sqlite(path)
        s = StateStore(sqlite_engine(path, 5000))
    yield s
    s.dispose()


def letter(i: int, error_class: str, message: str, key: str | None = None) -> DeadLetter:
    return DeadLetter(
        stream="usage_events",
        sink="postgres" if i % 2 else "sqlite",
        source="usage" if i % 4 else "other",
        page_id=f"page-{i // 10}",
        record_key=key or f"key-{i}",
        record=record_of_row(["id"], [i]),
        error_class=error_class,
        error_message=message,
    )


def fill(store: StateStore, n: int = 60) -> None:
    """n letters, ids 1..n in order, letter i failing last at T0 + i minutes; a third of them
    RejectedBySink, the rest ValidationError."""
    for i in range(n):
        cls = "RejectedBySink" if i % 3 == 0 else "ValidationError"
        write_letters(store, [letter(i, cls, f"metric_value: rule {i}")])
    with store.write() as conn:
        for i in range(n):
            at = store.ts(T0 + timedelta(minutes=i))
            conn.execute(
                text(
                    "UPDATE failed_ingestions SET first_failed_at = :t, last_failed_at = :t"
                    " WHERE record_key = :k"
                ),
                {"t": at, "k": f"key-{i}"},
            )


def test_pages_walk_every_letter_once_newest_first(store: StateStore) -> None:
    fill(store)
    seen: list[int] = []
    f = dlq.Filters()
    while True:
        page = dlq.page_letters(store, f, limit=7)
        seen += [r["id"] for r in page.rows]
        if page.next_after_id is None:
            break
        f.after_id = page.next_after_id
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen)) == 60 == dlq.count_letters(store, dlq.Filters())
    # A page that is exactly full at the end says there is no more.
    last = dlq.page_letters(store, dlq.Filters(after_id=min(seen) + 3), limit=3)
    assert [r["id"] for r in last.rows] == [min(seen) + 2, min(seen) + 1, min(seen)]
    assert last.next_after_id is None


def test_filters_select_what_they_name(store: StateStore) -> None:
    fill(store)
    by_class = dlq.page_letters(store, dlq.Filters(error_class="RejectedBySink"), limit=100)
    assert len(by_class.rows) == 20
    assert {r["error_class"] for r in by_class.rows} == {"RejectedBySink"}
    # error_class is exact: a prefix selects nothing.
    assert dlq.count_letters(store, dlq.Filters(error_class="Rejected")) == 0
    assert dlq.count_letters(store, dlq.Filters(source="other")) == 15
    assert dlq.count_letters(store, dlq.Filters(sink="postgres", source="usage")) == 30
    # text: a substring of the key or the error, case-insensitive.
    assert dlq.count_letters(store, dlq.Filters(text="KEY-1")) == 11  # key-1, key-10..19
    assert dlq.count_letters(store, dlq.Filters(text="rule 42")) == 1
    # A time range on the last failure: [since, until).
    since = (T0 + timedelta(minutes=10)).isoformat()
    f = dlq.Filters(since=since, until=T0 + timedelta(minutes=20))
    assert sorted(r["record_key"] for r in dlq.page_letters(store, f, 100).rows) == sorted(
        f"key-{i}" for i in range(10, 20)
    )


def test_text_matches_percent_and_underscore_as_themselves(store: StateStore) -> None:
    write_letters(store, [letter(1, "E", "ok", key="a%b"), letter(2, "E", "ok", key="axb")])
    write_letters(store, [letter(3, "E", "ok", key="a_c"), letter(4, "E", "ok", key="abc")])
    assert [r["record_key"] for r in dlq.page_letters(store, dlq.Filters(text="a%b")).rows] == [
        "a%b"
    ]
    assert [r["record_key"] for r in dlq.page_letters(store, dlq.Filters(text="a_c")).rows] == [
        "a_c"
    ]


def test_groups_count_each_class_with_its_first_and_last_failure(store: StateStore) -> None:
    fill(store)
    groups = {g.error_class: g for g in dlq.error_groups(store, dlq.Filters())}
    assert set(groups) == {"RejectedBySink", "ValidationError"}
    assert groups["ValidationError"].count == 40
    assert groups["RejectedBySink"].count == 20
    assert groups["RejectedBySink"].first_at == T0
    assert groups["RejectedBySink"].last_at == T0 + timedelta(minutes=57)
    assert groups["ValidationError"].first_at == T0 + timedelta(minutes=1)
    assert groups["ValidationError"].last_at == T0 + timedelta(minutes=59)
    assert [g.error_class for g in dlq.error_groups(store, dlq.Filters())] == [
        "ValidationError",
        "RejectedBySink",
    ]
    # Groups follow the filters.
    only = dlq.error_groups(store, dlq.Filters(source="other"))
    assert sum(g.count for g in only) == 15


def test_discard_needs_a_selection_and_a_dry_run_changes_nothing(store: StateStore) -> None:
    fill(store)
    with pytest.raises(dlq.NoFilterError):
        dlq.discard(store, dlq.Filters())
    assert dlq.count_letters(store, dlq.Filters()) == 60
    f = dlq.Filters(error_class="RejectedBySink")
    assert dlq.discard(store, f, dry_run=True) == 20
    assert dlq.count_letters(store, dlq.Filters()) == 60
    assert dlq.discard(store, f) == 20
    assert dlq.count_letters(store, dlq.Filters()) == 40
    assert dlq.count_letters(store, dlq.Filters(status="discarded")) == 20
    # --limit: the oldest first, exactly that many.
    assert dlq.discard(store, dlq.Filters(source="usage", limit=5), dry_run=True) == 5
    assert dlq.discard(store, dlq.Filters(source="usage", limit=5)) == 5
    assert dlq.count_letters(store, dlq.Filters()) == 35
    # Everything, when asked for in so many words.
    assert dlq.discard(store, dlq.Filters(), everything=True) == 35
    assert dlq.count_letters(store, dlq.Filters()) == 0


def add_run(
    store: StateStore, run_id: str, source: str, status: str, at: datetime, kind: str = "produce"
) -> None:
    with store.write() as conn:
        conn.execute(
            text(
                "INSERT INTO source_runs (run_id, source, stream, kind, started_at, finished_at,"
                " status, pages, records) VALUES (:r, :s, 'usage_events', :k, :t, :f, :st, 2, 9)"
            ),
            {
                "r": run_id,
                "s": source,
                "k": kind,
                "t": store.ts(at),
                "f": store.ts(at + timedelta(seconds=3)),
                "st": status,
            },
        )


def test_run_history_pages_filters_and_latest(store: StateStore) -> None:
    for i in range(30):
        source = ("usage", "binance", "bot")[i % 3]
        status = "failed" if i % 5 == 0 else "ok"
        # Runs 20 and 21 start at the same moment: the run id breaks the tie.
        at = T0 + timedelta(minutes=20 if i == 21 else i)
        add_run(store, f"run-{i:02d}", source, status, at, "backfill" if i == 7 else "produce")
    seen: list[str] = []
    f = runs.RunFilters(limit=4)
    while True:
        page = runs.list_runs(store, f)
        seen += [r["run_id"] for r in page.rows]
        if page.next_before is None:
            break
        f.before = page.next_before
    expected = sorted((f"run-{i:02d}" for i in range(30)), reverse=True)
    expected.remove("run-21")
    expected.insert(expected.index("run-20"), "run-21")  # same start, larger id first
    assert seen == expected
    first = runs.list_runs(store, runs.RunFilters(limit=1)).rows[0]
    assert first["seconds"] == 3.0
    assert first["started_at"] == T0 + timedelta(minutes=29)
    failed = runs.list_runs(store, runs.RunFilters(status="failed", limit=100)).rows
    assert [r["run_id"] for r in failed] == [f"run-{i:02d}" for i in (25, 20, 15, 10, 5, 0)]
    usage = runs.list_runs(store, runs.RunFilters(source="usage", status="ok", limit=100)).rows
    assert {r["source"] for r in usage} == {"usage"} and len(usage) == 8
    assert [r["run_id"] for r in runs.list_runs(store, runs.RunFilters(kind="backfill")).rows] == [
        "run-07"
    ]
    latest = runs.latest_runs(store)
    assert {k: v["run_id"] for k, v in latest.items()} == {
        "usage": "run-27",
        "binance": "run-28",
        "bot": "run-29",
    }


def test_show_run_has_its_pages_and_their_letters(store: StateStore) -> None:
    add_run(store, "r1", "usage", "ok", T0)
    with store.write() as conn:
        for page, sink in (("page-0", "postgres"), ("page-0", "sqlite"), ("page-1", "postgres")):
            conn.execute(
                text(
                    "INSERT INTO ingestion_runs (page_id, sink, stream, source, run_id, received,"
                    " inserted, duplicates, invalid, started_at, committed_at) VALUES (:p, :s,"
                    " 'usage_events', 'usage', 'r1', 10, 9, 0, 1, :t, :t)"
                ),
                {"p": page, "s": sink, "t": store.ts(T0)},
            )
    write_letters(store, [letter(i, "ValidationError", "bad") for i in range(25)])  # pages 0-2
    detail = runs.show_run(store, "r1")
    assert detail.run["status"] == "ok"
    assert [(p["page_id"], p["sink"]) for p in detail.pages] == [
        ("page-0", "postgres"),
        ("page-0", "sqlite"),
        ("page-1", "postgres"),
    ]
    assert detail.letters_total == 20  # page-2's letters belong to another run
    assert {x["page_id"] for x in detail.letters} == {"page-0", "page-1"}
    with pytest.raises(runs.UnknownRunError):
        runs.show_run(store, "nope")


def test_pause_is_kept_until_resumed(store: StateStore) -> None:
    assert paused(store, "usage") is None
    set_paused(store, "usage", True, "maintenance")
    control = paused(store, "usage")
    assert control is not None and control.reason == "maintenance"
    set_paused(store, "usage", False)
    assert paused(store, "usage") is None


def test_cli_pages_groups_and_dry_runs(env: Env) -> None:
    env.write_config("")
    store = StateStore(postgres_engine(env.pg_url))
    fill(store, 30)
    store.dispose()
    first = sluice("dlq", "list", "--limit", "12", "--json", env=env.vars)
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)
    assert len(rows) == 12 and rows[0]["record_key"] == "key-29"
    after = re.search(r"--after (\d+)", first.stderr)
    assert after is not None
    second = json.loads(
        sluice("dlq", "list", "--limit", "12", "--after", after[1], "--json", env=env.vars).stdout
    )
    assert [r["record_key"] for r in second] == [f"key-{i}" for i in range(17, 5, -1)]
    groups = sluice("dlq", "groups", env=env.vars).stdout.splitlines()
    assert "error class" in groups[0]
    assert groups[1].split()[0] == "20" and groups[1].endswith("ValidationError")
    assert groups[2].split()[0] == "10" and groups[2].endswith("RejectedBySink")
    assert "2026-01-01 00:00:00" in groups[2]  # the first RejectedBySink failure
    dry = sluice("dlq", "discard", "--error-class", "RejectedBySink", "--dry-run", env=env.vars)
    assert dry.stdout.strip() == "would discard 10 dead letter(s)"
    nothing = sluice("dlq", "discard", env=env.vars)
    assert nothing.returncode == 2 and "--all" in nothing.stderr
    done = sluice("dlq", "discard", "--error-class", "RejectedBySink", "--json", env=env.vars)
    assert json.loads(done.stdout) == {"discarded": 10, "dry_run": False}
    left = json.loads(sluice("dlq", "groups", "--json", env=env.vars).stdout)
    assert [(g["error_class"], g["count"]) for g in left] == [("ValidationError", 20)]

"""The console's JSON API and pages over HTTP (a real uvicorn on 127.0.0.1), on both state
stores: PostgreSQL, and the SQLite file of a deployment without PostgreSQL. Authentication,
CSRF, escaping, security headers, the OpenAPI description, and the dead-letter, run and source
operations through the same functions the CLI uses."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute

from sluice.ops.console import api as api_module
from sluice.ops.console import create_app
from sluice.ops.console.auth import ConsoleAuth
from sluice.ops.sample import COLUMNS, generate_rows, write_d1_file
from sluice.ops.serve import bind
from sluice.shared.celery_app import app as celery
from sluice.shared.letters import DeadLetter, record_of_row, write_letters
from sluice.shared.migrations import migrate_sqlite
from sluice.shared.settings import Settings
from tests.conftest import Env
from tests.helpers import d1_config

TOKEN = "t0k3n-for-tests-" + "x" * 24
MARKUP = '<script>alert("owned")</script><img src=x onerror=alert(1)>'


@contextmanager
def running(web: FastAPI) -> Iterator[str]:
    """The app on uvicorn in a thread, on a free loopback port; its base URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(web, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def sqlite_only(env: Env, d1: Path) -> None:
    """A deployment without PostgreSQL: the stream writes to the SQLite file, which also holds
    the state."""
    env.vars.pop("SLUICE_POSTGRES_URL", None)
    env.write_config(d1_config(d1) + '\n[streams.usage_events]\nsinks = ["sqlite"]\n')


@dataclass
class Deployment:
    settings: Settings
    url: str
    store_kind: str
    d1: Path  # the D1 source's file


@pytest.fixture(params=["postgres", "sqlite"])
def deployment(request: pytest.FixtureRequest, env: Env) -> Iterator[Deployment]:
    d1 = env.dir / "d1.sqlite"
    write_d1_file(d1, 50)
    if request.param == "sqlite":
        sqlite_only(env, d1)
    else:
        env.write_config(d1_config(d1))
    migrate_sqlite(env.sqlite_path)
    settings = Settings.load(env.vars)
    ctx = celery.configure(settings)
    web = create_app(ctx, celery, auth=ConsoleAuth(token=TOKEN, user="ops", password="pw"))
    with running(web) as url:
        yield Deployment(settings, url, request.param, d1)
    ctx.close()


def valid_row(i: int) -> list[Any]:
    rows, _, _ = generate_rows(200)
    return list(rows[i])


def letters(settings: Settings, n: int, error_class: str, sink: str, start: int = 0) -> None:
    from sluice.shared.state import open_state

    store = open_state(settings)
    try:
        write_letters(
            store,
            [
                DeadLetter(
                    stream="usage_events",
                    sink=sink,
                    source="d1_usage",
                    page_id=f"page-{error_class}",
                    record_key=str(valid_row(start + i)[3]),
                    record=record_of_row(COLUMNS, valid_row(start + i)),
                    error_class=error_class,
                    error_message=f"{error_class}: the sink refused it (test {i})",
                )
                for i in range(n)
            ],
        )
    finally:
        store.dispose()


def sink_of(d: Deployment) -> str:
    """The sink the deployment's stream writes to."""
    return "postgres" if d.store_kind == "postgres" else "sqlite"


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def api(d: Deployment, path: str, **params: Any) -> Any:
    r = requests.get(f"{d.url}/api/v1{path}", headers=bearer(), params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def post(d: Deployment, path: str, body: Any = None) -> requests.Response:
    return requests.post(f"{d.url}/api/v1{path}", headers=bearer(), json=body, timeout=30)


def test_everything_but_health_and_metrics_needs_credentials(deployment: Deployment) -> None:
    url = deployment.url
    for path in ("/api/v1/letters", "/api/v1/status", "/status", "/stats", "/api/v1/openapi.json"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
        assert "Bearer" in r.headers["WWW-Authenticate"]
    page = requests.get(url + "/letters", timeout=30, allow_redirects=False)
    assert page.status_code == 303 and page.headers["Location"].startswith("/login?next=")
    wrong = requests.get(url + "/api/v1/letters", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = base64.b64encode(b"ops:pw").decode()
    ok = requests.get(url + "/api/v1/letters", headers={"Authorization": f"Basic {basic}"})
    assert ok.status_code == 200
    bad = base64.b64encode(b"ops:wrong").decode()
    assert (
        requests.get(url + "/api/v1/letters", headers={"Authorization": f"Basic {bad}"}).status_code
        == 401
    )

    health = requests.get(url + "/health", timeout=30)
    assert health.status_code in (200, 503) and "checks" in health.json()
    metrics = requests.get(url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "sluice_" in metrics.text
    assert TOKEN not in metrics.text and TOKEN not in health.text


def test_security_headers(deployment: Deployment) -> None:
    r = requests.get(deployment.url + "/api/v1/letters", headers=bearer(), timeout=30)
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp


def login(d: Deployment) -> tuple[requests.Session, str]:
    """A browser-like session logged in with the token; its CSRF token."""
    s = requests.Session()
    form = s.get(d.url + "/login", timeout=30)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf, form.text
    r = s.post(
        d.url + "/login",
        data={"token": TOKEN, "csrf_token": csrf.group(1), "next": "/letters"},
        timeout=30,
        allow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["Location"] == "/letters"
    return s, csrf.group(1)


def test_a_post_without_the_csrf_token_is_refused(deployment: Deployment) -> None:
    d = deployment
    letters(
        d.settings, 3, "OperationalError", "postgres" if d.store_kind == "postgres" else "sqlite"
    )
    s, csrf = login(d)
    body = {"action": "discard", "status": "pending", "error_class": "OperationalError"}
    refused = s.post(d.url + "/letters/apply", data=body, timeout=30)
    assert refused.status_code == 403 and "CSRF" in refused.text
    wrong = s.post(d.url + "/letters/apply", data={**body, "csrf_token": "forged"}, timeout=30)
    assert wrong.status_code == 403
    # The API with a session cookie needs the header too; with the Bearer token it does not.
    assert s.post(d.url + "/api/v1/letters/discard", json={"error_class": "X"}).status_code == 403
    assert api(d, "/letters/count")["count"] == 3  # nothing was discarded
    done = s.post(d.url + "/letters/apply", data={**body, "csrf_token": csrf}, timeout=30)
    assert done.status_code == 200 and "Discarded 3 dead letter(s)" in done.text
    assert api(d, "/letters/count")["count"] == 0
    # A login form without the token is refused as well.
    fresh = requests.Session()
    fresh.get(d.url + "/login", timeout=30)
    assert fresh.post(d.url + "/login", data={"token": TOKEN}, timeout=30).status_code == 403


def test_markup_in_a_payload_renders_as_text(deployment: Deployment) -> None:
    d = deployment
    from sluice.shared.state import open_state

    store = open_state(d.settings)
    row = valid_row(0)
    row[4] = MARKUP  # the metric
    write_letters(
        store,
        [
            DeadLetter(
                stream="usage_events",
                sink="sqlite",
                source="d1_usage",
                page_id="p",
                record_key=MARKUP,
                record=record_of_row(COLUMNS, row),
                error_class="ValidationError",
                error_message=f"metric: {MARKUP}",
            )
        ],
    )
    store.dispose()
    s, _ = login(d)
    listing = s.get(d.url + "/letters", timeout=30).text
    letter_id = api(d, "/letters")["letters"][0]["id"]
    detail = s.get(f"{d.url}/letters/{letter_id}", timeout=30).text
    for page in (listing, detail):
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(" in page
    assert "onerror=alert(1)&gt;" in detail


def test_letters_filter_group_dry_run_and_discard(deployment: Deployment) -> None:
    d = deployment
    sink = sink_of(d)
    letters(d.settings, 7, "OperationalError", sink)
    letters(d.settings, 4, "ValidationError", sink, start=50)
    groups = {g["error_class"]: g for g in api(d, "/letters/groups")["groups"]}
    assert {k: g["count"] for k, g in groups.items()} == {
        "OperationalError": 7,
        "ValidationError": 4,
    }
    assert groups["OperationalError"]["first_at"] <= groups["OperationalError"]["last_at"]
    page = api(d, "/letters", error_class="ValidationError", limit=3)
    assert len(page["letters"]) == 3 and page["next_after_id"] is not None
    rest = api(d, "/letters", error_class="ValidationError", after_id=page["next_after_id"])
    assert len(rest["letters"]) == 1 and rest["next_after_id"] is None
    assert api(d, "/letters/count", text="test 3")["count"] == 2  # one per class

    dry = post(d, "/letters/discard", {"error_class": "ValidationError"})
    assert dry.status_code == 200 and dry.json() == {"dry_run": True, "discarded": 4}
    assert api(d, "/letters/count")["count"] == 11
    # No selection beyond the status: refused, not "discard everything".
    refused = post(d, "/letters/discard", {"dry_run": False})
    assert refused.status_code == 400 and "selection" in refused.json()["error"]
    done = post(d, "/letters/discard", {"error_class": "ValidationError", "dry_run": False})
    assert done.json()["discarded"] == 4
    assert api(d, "/letters/count")["count"] == 7
    assert api(d, "/letters/count", status="discarded")["count"] == 4

    replay_dry = post(d, "/letters/replay", {"error_class": "OperationalError"}).json()
    assert replay_dry["dry_run"] and replay_dry["records"] == 7
    assert api(d, "/letters/count", error_class="OperationalError")["count"] == 7

    one = api(d, "/letters")["letters"][0]
    shown = api(d, f"/letters/{one['id']}")
    assert shown["record"]["columns"] == list(COLUMNS)
    missing = requests.get(f"{d.url}/api/v1/letters/999999", headers=bearer(), timeout=30)
    assert missing.status_code == 404 and "no dead letter" in missing.json()["error"]


def test_sources_pause_resume_run_and_runs(deployment: Deployment) -> None:
    d = deployment
    listed = api(d, "/sources")["sources"]
    assert listed["d1_usage"]["kind"] == "d1" and listed["d1_usage"]["paused"] is False
    assert post(d, "/sources/d1_usage/pause", {"reason": "maintenance"}).status_code == 200
    assert api(d, "/sources")["sources"]["d1_usage"]["paused_reason"] == "maintenance"
    refused = post(d, "/sources/d1_usage/run")
    assert refused.status_code == 400 and "paused" in refused.json()["error"]
    assert post(d, "/sources/d1_usage/resume").status_code == 200
    started = post(d, "/sources/d1_usage/run")
    assert started.status_code == 200, started.text
    run_id = started.json()["run_id"]
    run = api(d, f"/runs/{run_id}")["run"]
    assert run["status"] == "queued" and run["source"] == "d1_usage"
    assert api(d, "/runs", source="d1_usage")["runs"][0]["run_id"] == run_id
    assert api(d, "/runs/latest")["runs"]["d1_usage"]["run_id"] == run_id
    unknown = post(d, "/sources/nope/pause")
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]
    # A D1 source has no time cursor to reset; the API says so rather than failing.
    reset = post(d, "/sources/d1_usage/reset", {"to": "2026-01-01T00:00:00Z", "confirm": True})
    assert reset.status_code == 400 and "cursor" in reset.json()["error"]
    stats = requests.get(d.url + "/stats", headers=bearer(), timeout=30).json()
    sink = sink_of(d)
    assert stats["sinks"][sink]["tables"]["usage_events"] == 0
    assert stats["sinks"][sink]["schema_version"]


def test_every_api_route_is_in_the_openapi_description(deployment: Deployment) -> None:
    d = deployment
    schema = api(d, "/openapi.json")
    described = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    web = requests.get(d.url + "/api/v1/docs", headers=bearer(), timeout=30)
    assert web.status_code == 200
    served = set()
    for route in api_module.router.routes:
        assert isinstance(route, APIRoute)
        if route.path == "/api/v1/openapi.json":  # the description itself
            continue
        for method in route.methods or ():
            served.add((method, route.path))
    assert served and served <= described, served - described
    for _, path in served:
        assert path in web.text, path


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def test_a_letter_is_edited_or_fetched_again_from_its_page(deployment: Deployment) -> None:
    d = deployment
    sink = sink_of(d)
    letters(d.settings, 2, "ValidationError", sink)
    first, second = sorted(r["id"] for r in api(d, "/letters")["letters"])
    s, _ = login(d)
    page = s.get(f"{d.url}/letters/{first}", timeout=30)
    assert page.status_code == 200 and "Edit and queue" in page.text
    csrf = form_token(page.text)

    # What the stream would refuse is shown with the form, and nothing is queued.
    values = api(d, f"/letters/{first}")["record"]
    record = dict(zip(values["columns"], values["row"], strict=True))
    bad = s.post(
        f"{d.url}/letters/{first}/edit",
        data={"csrf_token": csrf, "record": json.dumps({**record, "metric_value": "lots"})},
        timeout=30,
    )
    assert bad.status_code == 422 and "invalid" in bad.text and "nothing was queued" in bad.text
    not_json = s.post(
        f"{d.url}/letters/{first}/edit", data={"csrf_token": csrf, "record": "{"}, timeout=30
    )
    assert not_json.status_code == 422
    assert api(d, f"/letters/{first}")["status"] == "pending"
    good = s.post(
        f"{d.url}/letters/{first}/edit",
        data={"csrf_token": csrf, "record": json.dumps({**record, "metric_value": 1.5})},
        timeout=30,
    )
    assert good.status_code == 200 and "Queued the edited record" in good.text
    assert api(d, f"/letters/{first}")["status"] == "replayed"

    # The D1 file still holds the second letter's key: read again, and queued.
    key = api(d, f"/letters/{second}")["record_key"]
    conn = sqlite3.connect(d.d1)
    conn.execute("UPDATE usage_events SET idempotency_key = ? WHERE rowid = 1", (key,))
    conn.commit()
    conn.close()
    fetched = s.post(f"{d.url}/letters/{second}/refetch", data={"csrf_token": csrf}, timeout=30)
    assert fetched.status_code == 200, fetched.text
    assert "Re-read the record from its source" in fetched.text
    assert api(d, f"/letters/{second}")["status"] == "replayed"
    # A key the source does not hold: said so, nothing changes.
    from sluice.shared.state import open_state

    store = open_state(d.settings)
    row = valid_row(0)
    row[3] = "idem_not_in_the_source"
    write_letters(
        store,
        [
            DeadLetter(
                stream="usage_events",
                sink=sink,
                source="d1_usage",
                page_id="p",
                record_key="idem_not_in_the_source",
                record=record_of_row(COLUMNS, row),
                error_class="SchemaMismatch",
                error_message="column metric_unit does not exist",
            )
        ],
    )
    store.dispose()
    third = api(d, "/letters", error_class="SchemaMismatch")["letters"][0]["id"]
    gone = post(d, f"/letters/{third}/refetch")
    assert gone.status_code == 200 and gone.json()["missing"] and not gone.json()["refetched"]
    page = s.post(f"{d.url}/letters/{third}/refetch", data={"csrf_token": csrf}, timeout=30)
    assert page.status_code == 409 and "has no record with key" in page.text


def test_a_cursor_reset_is_confirmed_and_a_backfill_is_followed(env: Env) -> None:
    """An HTTP API source: the reset asks first; the backfill's run page shows its range."""
    env.write_config(
        """
[sources.bn]
kind = "binance"
base_url = "http://127.0.0.1:9"
symbols = ["BTCUSDT", "ETHUSDT"]
interval = "1h"
"""
    )
    settings = Settings.load(env.vars)
    ctx = celery.configure(settings)
    web = create_app(ctx, celery, auth=ConsoleAuth(token=TOKEN))
    with running(web) as url:
        d = Deployment(settings, url, "postgres", env.dir / "none")
        s, csrf = login(d)
        ask = s.post(
            url + "/sources/bn/reset",
            data={"csrf_token": csrf, "to": "2026-01-01T00:00:00Z"},
            timeout=30,
        )
        assert ask.status_code == 200 and "Reset the cursor of bn?" in ask.text
        assert api(d, "/runs")["runs"] == []  # nothing moved yet
        from sluice.producers.cursors import CursorStore

        assert CursorStore(ctx.state).get_all("bn") == {}
        done = s.post(
            url + "/sources/bn/reset",
            data={"csrf_token": csrf, "to": "2026-01-01T00:00:00Z", "confirm": "yes"},
            timeout=30,
        )
        assert done.status_code == 200 and "Reset the cursors of bn" in done.text
        cursors = CursorStore(ctx.state).get_all("bn")
        assert set(cursors) == {"BTCUSDT", "ETHUSDT"}
        assert {c.isoformat() for c in cursors.values()} == {"2026-01-01T00:00:00+00:00"}
        bad = s.post(url + "/sources/bn/reset", data={"csrf_token": csrf, "to": "soon"})
        assert bad.status_code == 422 and "not an ISO-8601 time" in bad.text

        started = s.post(
            url + "/sources/bn/backfill",
            data={"csrf_token": csrf, "start": "2026-01-01", "end": "2026-01-02"},
            timeout=30,
        )
        assert started.status_code == 200 and "/runs/" in started.url
        run_id = started.url.rsplit("/", 1)[1]
        assert "2026-01-01T00:00:00Z → 2026-01-02T00:00:00Z" in started.text
        progress = api(d, f"/backfills/{run_id}")
        assert progress["status"] == "queued" and progress["source"] == "bn"
        by_api = post(d, "/sources/bn/backfill", {"start": "2026-02-01", "end": "2026-01-01"})
        assert by_api.status_code == 400 and "after its start" in by_api.json()["error"]
        unconfirmed = post(d, "/sources/bn/reset", {"to": "2026-01-01T00:00:00Z"})
        assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.json()["error"]
    ctx.close()


def test_no_template_lets_data_through_unescaped() -> None:
    """Autoescape is on for every template, and none marks a value safe or turns escaping off:
    a record's text can never become markup."""
    from sluice.ops.console.web import ENV

    folder = Path(api_module.__file__).parent / "templates"
    templates = sorted(folder.glob("*.html"))
    assert len(templates) >= 10
    for path in templates:
        text = path.read_text()
        for unsafe in ("|safe", "| safe", "autoescape false", "Markup(", "style="):
            assert unsafe not in text, f"{path.name}: {unsafe}"
        assert "<script>" not in text and "onclick" not in text, path.name  # CSP: no inline JS
    assert ENV.autoescape is True
    assert "&lt;b&gt;" in ENV.from_string("{{ v }}").render(v="<b>")


def test_every_page_renders_on_either_store(deployment: Deployment) -> None:
    d = deployment
    letters(d.settings, 2, "OperationalError", sink_of(d))
    run_id = post(d, "/sources/d1_usage/run").json()["run_id"]
    letter_id = api(d, "/letters")["letters"][0]["id"]
    for path, expected in [
        ("/", "d1_usage"),
        ("/letters", "OperationalError"),
        (f"/letters/{letter_id}", "the sink refused it"),
        ("/runs", run_id[:12]),
        (f"/runs/{run_id}", "queued"),
        ("/sources", "Run now"),
        ("/api/v1/docs", "/api/v1/letters/groups"),
    ]:
        r = requests.get(d.url + path, headers=bearer(), timeout=60)
        assert r.status_code == 200, (path, r.text[:500])
        assert expected in r.text, path
        assert r.headers["Content-Type"].startswith("text/html")
    overview = requests.get(d.url + "/", headers=bearer(), timeout=60).text
    assert f"state in {d.store_kind}" in overview
    status = api(d, "/status")
    assert status["state"] == d.store_kind
    missing = requests.get(d.url + "/runs/nope", headers=bearer(), timeout=30)
    assert missing.status_code == 404 and "no run with id" in missing.text


def test_an_unreachable_state_store_is_said_in_one_line(env: Env) -> None:
    """PostgreSQL down: the API answers 503 naming it, the pages say it, the overview still
    shows what it could read; nothing answers with a traceback."""
    env.write_config(d1_config(env.dir / "d1.sqlite"))
    down = dict(env.vars, SLUICE_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/sluice")
    settings = Settings.load(down)
    ctx = celery.configure(settings)
    web = create_app(ctx, celery, auth=ConsoleAuth(token=TOKEN))
    with running(web) as url:
        r = requests.get(url + "/api/v1/letters", headers=bearer(), timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"].startswith("cannot reach PostgreSQL")
        page = requests.get(url + "/runs", headers=bearer(), timeout=60)
        assert page.status_code == 503 and "cannot reach PostgreSQL" in page.text
        assert "Traceback" not in page.text
        overview = requests.get(url + "/", headers=bearer(), timeout=60)
        assert overview.status_code == 200 and "Could not read everything" in overview.text
        assert "postgres" in overview.text
    ctx.close()

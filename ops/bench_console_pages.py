"""The console's pages and API over HTTP, timed on a filled state store.

`sluice bench console --postgres-server URL` fills (and leaves) a database of dead letters and
runs and times the queries; this times what an operator's browser waits for on that database:
the app on uvicorn on a loopback port, each page or API call repeated (median and max of 7
after one warm-up), through the same auth, rendering and JSON encoding as `sluice serve`.

    python -m sluice.ops.bench_console_pages --postgres-url postgresql://…/sluice_console_bench

Without workers or a broker: the overview (which waits for workers to answer) is left out.
"""

from __future__ import annotations

import json
import secrets
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import quote

import click
import requests
import uvicorn

from sluice.ops.console import create_app
from sluice.ops.console.auth import ConsoleAuth
from sluice.ops.serve import bind
from sluice.shared.celery_app import app as celery
from sluice.shared.context import Context
from sluice.shared.settings import Settings

REPEAT = 7


@dataclass
class PageTiming:
    name: str
    path: str
    median_ms: float
    max_ms: float


@contextmanager
def _serving(postgres_url: str) -> Iterator[tuple[str, str]]:
    """The console on a free loopback port over the database; its base URL and token."""
    token = secrets.token_hex(16)
    with TemporaryDirectory() as tmp:
        config = Path(tmp) / "sluice.toml"
        config.write_text('[pipeline]\nstate = "postgres"\n')
        env = {
            "SLUICE_CONFIG": str(config),
            "SLUICE_POSTGRES_URL": postgres_url,
            "SLUICE_DATA_DIR": tmp,
            "SLUICE_BROKER_URL": "redis://127.0.0.1:1/0",  # never reached: no page here asks
        }
        ctx = Context(Settings.load(env))
        web = create_app(ctx, celery, auth=ConsoleAuth(token=token))
        sock = bind("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(web, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the console did not start")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", token
        finally:
            server.should_exit = True
            thread.join(15)
            sock.close()
            ctx.close()


def _timed(session: requests.Session, url: str) -> tuple[float, float]:
    session.get(url, timeout=120).raise_for_status()
    times = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        session.get(url, timeout=120).raise_for_status()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 1), round(max(times), 1)


def time_pages(postgres_url: str, deep_pages: int = 200) -> list[PageTiming]:
    with _serving(postgres_url) as (base, token):
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"

        def get(path: str) -> Any:
            r = s.get(base + path, timeout=120)
            r.raise_for_status()
            return r.json()

        groups = get("/api/v1/letters/groups")["groups"]
        if not groups:
            raise click.ClickException("the database holds no pending dead letters")
        small = groups[-1]["error_class"]  # the rarest class: its pages reach furthest back
        big = groups[0]["error_class"]
        after = get("/api/v1/letters?limit=50")["next_after_id"]
        for _ in range(deep_pages):
            after = get(f"/api/v1/letters?limit=50&after_id={after}")["next_after_id"] or after
        run_source = (get("/api/v1/runs?limit=1")["runs"] or [{"source": ""}])[0]["source"]
        plan = [
            ("dead letters page (first page and groups)", "/letters"),
            (f"dead letters page, {deep_pages} pages deep", f"/letters?after_id={after}"),
            (f"dead letters page, class {big}", f"/letters?error_class={quote(big)}"),
            (f"dead letters page, class {small}", f"/letters?error_class={quote(small)}"),
            ("dead letters page, text search", "/letters?text=timeout"),
            ("API letters, first page", "/api/v1/letters?limit=50"),
            (f"API letters, {deep_pages} pages deep", f"/api/v1/letters?limit=50&after_id={after}"),
            ("API letter groups", "/api/v1/letters/groups"),
            (f"API count, class {big}", f"/api/v1/letters/count?error_class={quote(big)}"),
            ("runs page", "/runs"),
            ("runs page, failed", "/runs?status=failed"),
            ("runs page, one source", f"/runs?source={quote(run_source)}"),
            ("API runs, first page", "/api/v1/runs?limit=50"),
            ("API latest run per source", "/api/v1/runs/latest"),
        ]
        out = []
        for name, path in plan:
            median, worst = _timed(s, base + path)
            out.append(PageTiming(name, path, median, worst))
        return out


@click.command()
@click.option(
    "--postgres-url",
    required=True,
    metavar="URL",
    help="The filled database (`sluice bench console --postgres-server …` leaves it).",
)
@click.option("--deep", default=200, metavar="N", help="How many pages deep the deep page is.")
@click.option("--json", "as_json", is_flag=True, help="Print the timings as JSON.")
def main(postgres_url: str, deep: int, as_json: bool) -> None:
    """Time the console's pages over HTTP on a filled database.

    \b
    Example:
      python -m sluice.ops.bench_console_pages --postgres-url postgresql://…/sluice_console_bench
    """
    found = time_pages(postgres_url, deep)
    if as_json:
        click.echo(json.dumps([asdict(t) for t in found]))
        return
    for t in found:
        click.echo(f"{t.name:48s} median {t.median_ms:8.1f} ms   max {t.max_ms:8.1f} ms")


if __name__ == "__main__":
    main()

"""`sluice bench`: how close the pipeline runs to the database's own limit."""

from __future__ import annotations

from pathlib import Path

import click

from sluice.ops.bench import POOLS, SINKS, BenchResult, format_result, run_bench
from sluice.ops.commands.common import (
    NON_NEGATIVE,
    POSITIVE,
    ExitCode,
    json_option,
    print_json,
)
from sluice.ops.commands.progress import Progress
from sluice.shared.embedded import stop_services

CONSOLE_STORES = ("postgres", "sqlite")


# Both benches run their own embedded servers in this folder, never on a real database.
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".sluice/bench"),
    help="Folder of the bench's own embedded servers and files (never a real database).",
)


@click.group(invoke_without_command=True)
@click.pass_context
@click.option(
    "--sink",
    "sinks",
    multiple=True,
    type=click.Choice(SINKS),
    help="Measure this sink (repeatable). Default: all of them.",
)
@click.option("--records", type=POSITIVE, metavar="N", default=1_000_000, help="Records per run.")
@click.option("--page-size", type=POSITIVE, metavar="N", default=1000, help="Records per page.")
@click.option(
    "--workers", type=POSITIVE, metavar="N", default=2, help="PostgreSQL worker concurrency."
)
@click.option(
    "--runs", type=POSITIVE, metavar="N", default=3, help="Runs; each figure is their median."
)
@click.option(
    "--naive-records",
    type=NON_NEGATIVE,
    metavar="N",
    default=20_000,
    help="Records for the task-per-record baseline (0: skip it).",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="solo",
    help="Worker layout: --workers solo processes, or one prefork/threads worker of that size.",
)
@click.option(
    "--prefill",
    type=NON_NEGATIVE,
    default=0,
    metavar="N",
    help="Rows already in the sink's table before each limit and pipeline run.",
)
@data_dir_option
@json_option
@click.option(
    "--keep-services", is_flag=True, help="Leave the bench's embedded servers running afterwards."
)
def bench(
    click_ctx: click.Context,
    sinks: tuple[str, ...],
    records: int,
    page_size: int,
    workers: int,
    runs: int,
    naive_records: int,
    pool: str,
    prefill: int,
    data_dir: Path,
    as_json: bool,
    keep_services: bool,
) -> ExitCode:
    """Measure the pipeline against the database's own limit.

    On the same generated records and its own embedded servers: the limit (the fastest
    idempotent in-process write, no queue), the pipeline (D1 file → Redis → real workers →
    sink), and on PostgreSQL a task-per-record baseline and dlt's merge when installed. With
    --json and one sink the result is that sink's object; with several, one per sink.

    \b
    Examples:
      sluice bench --sink postgres --records 200000 --runs 1
      sluice bench --json > bench.json
      sluice bench console --letters 1000000 --runs 1000000
    """
    if click_ctx.invoked_subcommand is not None:
        return ExitCode.OK  # `sluice bench console`: its own command measures
    results: list[BenchResult] = []
    try:
        for sink in sinks or SINKS:
            with Progress(f"bench {sink}", "steps", quiet=as_json) as progress:
                results.append(
                    run_bench(
                        sink,
                        records,
                        page_size,
                        workers,
                        runs,
                        naive_records,
                        data_dir,
                        progress.say,
                        pool,
                        prefill,
                        advance=progress.advance,
                    )
                )
    finally:
        if not keep_services:
            stop_services(data_dir.resolve())
    if as_json:
        doc = {r.sink: r.as_dict() for r in results}
        print_json(doc if len(results) > 1 else results[0].as_dict())
    else:
        click.echo("\n\n".join(format_result(r) for r in results))
    return ExitCode.OK


@bench.command()
@click.option(
    "--store",
    "stores",
    multiple=True,
    type=click.Choice(CONSOLE_STORES),
    help="Measure on this state store (repeatable). Default: both.",
)
@click.option(
    "--letters", type=POSITIVE, metavar="N", default=1_000_000, help="Dead letters to store."
)
@click.option(
    "--runs", "n_runs", type=POSITIVE, metavar="N", default=1_000_000, help="Source runs to store."
)
@click.option(
    "--queries", type=POSITIVE, metavar="N", default=700, help="Run history queries to time."
)
@click.option(
    "--postgres-server",
    metavar="URL",
    help="A PostgreSQL server to create the bench's database on (default: the bench's own"
    " embedded server in --data-dir).",
)
@click.option(
    "--database",
    default="sluice_console_bench",
    help="The database the bench creates (dropped first if it exists) on the server.",
)
@data_dir_option
@json_option
def console(
    stores: tuple[str, ...],
    letters: int,
    n_runs: int,
    queries: int,
    postgres_server: str | None,
    database: str,
    data_dir: Path,
    as_json: bool,
) -> ExitCode:
    """Time the console's queries on a million dead letters and runs.

    Fills a fresh database per store (--database on PostgreSQL, a file in --data-dir for
    SQLite) with --letters dead letters and --runs source runs, then times the first page of
    letters, a deep keyset page, pages filtered by class, source and text, counts and groups
    (medians of 5), and --queries run history queries (p50, p95).

    \b
    Examples:
      sluice bench console
      sluice bench console --store sqlite --letters 100000 --runs 100000 --json
    """
    from sluice.ops.bench_console import format_console_result, run_console_bench
    from sluice.shared.embedded import ensure_postgres

    data_dir = data_dir.resolve()
    results = []
    try:
        for store in stores or CONSOLE_STORES:
            server = ""
            if store == "postgres":
                server = postgres_server or ensure_postgres(data_dir)
            with Progress(f"bench console {store}", "steps", quiet=as_json) as progress:
                results.append(
                    run_console_bench(
                        store, letters, n_runs, queries, data_dir, server, progress.say, database
                    )
                )
    finally:
        if postgres_server is None:
            stop_services(data_dir)
    if as_json:
        print_json({r.store: r.as_dict() for r in results})
    else:
        click.echo("\n\n".join(format_console_result(r) for r in results))
    return ExitCode.OK

"""The pipeline's processes: `sluice worker`, `sluice beat`, and `sluice produce` (one run now)."""

from __future__ import annotations

import sys

import click

from sluice.ops.commands.common import (
    POSITIVE,
    CommandError,
    ExitCode,
    json_option,
    load_settings,
    pipeline_context,
    print_json,
)
from sluice.ops.workers import (
    MALLOC_ARENAS,
    THREADS_SWITCH_INTERVAL,
    cap_malloc_arenas,
    default_hostname,
)
from sluice.producers.schedule import BEAT_LOCK_TIMEOUT, BEAT_MAX_LOOP_INTERVAL
from sluice.shared.celery_app import QUEUES

OPS_TASKS = "sluice.ops.sources"  # the module of the tasks the operator's commands send
PRUNE_TASK = "sluice.ops.prune_task"

loglevel_option = click.option(
    "--loglevel",
    "-l",
    default="INFO",
    help="Celery's log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
)


@click.command()
@click.option(
    "--queues",
    help=f"Comma-separated queues to consume. Default: all of them ({','.join(QUEUES)}).",
)
@click.option(
    "--concurrency", "-c", type=int, default=2, help="Pool processes (or threads) per worker."
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    help="Let the pool grow up to MAX and shrink down to MIN processes with the load"
    " (instead of --concurrency); `sluice scale --autoscale` changes the range later.",
)
@click.option(
    "--hostname",
    "-n",
    help="Node name (%h: this host's name). Default: ROLE@%h, the role read from --queues:"
    " postgres, sqlite, d1 (one sink's queue), or sluice (several, or all).",
)
@click.option(
    "--pool",
    "-P",
    help="Celery pool: prefork (default), threads (the SQLite writer: its threads commit"
    " pages together), solo, …",
)
@loglevel_option
@click.option("--include", help="Extra task modules to load (comma-separated).")
def worker(
    queues: str | None,
    concurrency: int,
    autoscale: str | None,
    hostname: str | None,
    pool: str | None,
    loglevel: str,
    include: str | None,
) -> ExitCode:
    """Run a Celery worker on Sluice's queues.

    Consumes pages from the ingest.<sink> queues and writes them to their sink, stores dead
    letters and acknowledges pages to their sources. Run as many as needed, on as many
    machines, all pointed at one broker; one worker per SQLite file, with --pool threads.
    Each is named after its role (postgres@host, sqlite@host, …): `sluice status` lists
    workers by role and `sluice scale --role` resizes one role.

    \b
    Examples:
      sluice worker --queues ingest.postgres,dead_letter,progress,produce -c 4
      sluice worker --queues ingest.sqlite --pool threads -c 16
      sluice worker --queues ingest.postgres -n postgres-2@%h
    """
    from sluice.shared.celery_app import app

    if pool == "threads":
        cap_malloc_arenas(MALLOC_ARENAS)
        sys.setswitchinterval(THREADS_SWITCH_INTERVAL)
    app.configure(load_settings())
    consumed = queues or ",".join(QUEUES)
    argv = ["worker", "-Q", consumed, "-l", loglevel]
    argv += ["--without-gossip", "--without-mingle"]
    argv += ["--autoscale", autoscale] if autoscale else ["-c", str(concurrency)]
    argv += ["-n", hostname or default_hostname(consumed.split(","))]
    if pool:
        argv += ["-P", pool]
    # Operators' tasks (a backfill started from the console) run on the workers too.
    # The scheduled prune (ops/prune_task.py) runs in whichever worker consumes `produce`.
    argv += ["--include", ",".join(filter(None, [OPS_TASKS, PRUNE_TASK, include]))]
    if pool == "threads":
        # Each thread already holds a page; prefetching more per thread only keeps more decoded
        # pages waiting in memory, for no gain in throughput.
        argv += ["--prefetch-multiplier", "1"]
    app.worker_main(argv)
    return ExitCode.OK


@click.command()
@loglevel_option
@click.option(
    "--lock-timeout",
    type=POSITIVE,
    default=BEAT_LOCK_TIMEOUT,
    metavar="SECONDS",
    help="How long after the active beat died a standby takes over.",
)
@click.option(
    "--max-loop-interval",
    type=POSITIVE,
    default=BEAT_MAX_LOOP_INTERVAL,
    metavar="SECONDS",
    help="How often the active beat renews its lock (and a standby checks it).",
)
def beat(loglevel: str, lock_timeout: int, max_loop_interval: int) -> ExitCode:
    """Run the scheduler that starts the sources' scheduled runs.

    Sends one produce task per source whenever its `schedule` (every N seconds, or a cron
    line) is due. The schedule and a lock live in Redis, so run one beat per machine if you
    like: exactly one dispatches, the others stand by and take over when it stops.

    \b
    Example:
      sluice beat --loglevel WARNING
    """
    from sluice.producers.schedule import beat_schedule, use_redbeat
    from sluice.shared.celery_app import app

    s = load_settings()
    ctx = app.configure(s)
    schedule = beat_schedule(s)
    if not schedule:
        raise CommandError("no source has a schedule in the config; nothing to run")
    redis_url = s.env.get("SLUICE_REDIS_URL") or ctx.broker_url
    use_redbeat(
        app, schedule, redis_url, lock_timeout=lock_timeout, max_loop_interval=max_loop_interval
    )
    app.Beat(loglevel=loglevel, scheduler="redbeat.RedBeatScheduler").run()
    return ExitCode.OK


@click.command()
@click.argument("source")
@click.option(
    "--max-batches",
    type=POSITIVE,
    metavar="N",
    help="Read at most N pages in this run. Default: the source's max_batches.",
)
@json_option
def produce(source: str, max_batches: int | None, as_json: bool) -> ExitCode:
    """Run one source once, now.

    Reads SOURCE (a name under [sources] in the config) after its pages in flight and puts
    each page on its sinks' queues, as a scheduled run would; the workers write them. Exits 1
    when the run failed; a run that finds the source busy with another run is "skipped".

    \b
    Examples:
      sluice produce usage
      sluice produce binance --max-batches 2 --json
    """
    from sluice.producers.produce import run_source

    summary = run_source(pipeline_context(), source, max_batches=max_batches)
    if as_json:
        print_json(summary.as_dict())
    else:
        click.echo(
            f"{summary.source}: {summary.status}, {summary.pages} page(s), "
            f"{summary.records} record(s) in {summary.seconds}s"
            + (f" — {summary.error}" if summary.error else "")
        )
    return ExitCode.FAILED if summary.status == "failed" else ExitCode.OK

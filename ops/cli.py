"""The `sluice` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sluice.shared.errors import SluiceError
from sluice.shared.settings import SINK_NAMES, D1SourceConfig, KvSourceConfig, Settings


def _settings() -> Settings:
    return Settings.load()


def cmd_config_check(args: argparse.Namespace) -> int:
    if args.file:
        os.environ["SLUICE_CONFIG"] = args.file
    s = _settings()
    where = s.config_path or "<no config file: defaults>"
    sources = s.sources
    print(f"{where}: OK — {len(sources)} source(s), {len(s.streams)} stream(s)")
    for name, src in sources.items():
        sched = src.schedule.model_dump(exclude_none=True) if src.schedule else "manual"
        kind = (
            f"{src.kind} {src.mode}, {src.capture}" if isinstance(src, D1SourceConfig) else src.kind
        )
        target = ", ".join(src.streams) if isinstance(src, KvSourceConfig) else src.stream
        print(f"  source {name}: {kind} → {target} (schedule: {sched})")
    if s.d1_sink is not None:
        token = "set" if s.secret(s.d1_sink.api_token_env) else "NOT SET"
        print(
            f"  sink d1: database {s.d1_sink.database_id} at {s.d1_sink.base_url}"
            f" (token in ${s.d1_sink.api_token_env}: {token})"
        )
    return check_online(s) if args.online else 0


def check_online(s: Settings) -> int:
    """Open each D1 source and check its configured columns against its table."""
    from sluice.producers.d1_source import open_d1_source

    failed = 0
    for name, src in s.sources.items():
        if not isinstance(src, D1SourceConfig):
            continue
        try:
            source = open_d1_source(name, src, s)
            try:
                problems = source.check()
            finally:
                source.close()
        except SluiceError as exc:
            problems = [str(exc)]
        failed += bool(problems)
        print(f"  source {name}: " + ("table OK" if not problems else "; ".join(problems)))
    return 1 if failed else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from sluice.shared.database import postgres_url
    from sluice.shared.migrations import migrate_postgres, migrate_sqlite
    from sluice.shared.state import state_kind

    s = _settings()
    # By default: the sinks the streams write to and the state store (the remote D1 sink only
    # when it is configured).
    used = {*s.sinks_fed, state_kind(s), *(["d1"] if s.d1_sink else [])}
    targets = args.sink or [t for t in ("postgres", "sqlite", "d1") if t in used]
    out: dict[str, list[str]] = {}
    if "postgres" in targets:
        out["postgres"] = migrate_postgres(postgres_url(s))
    if "sqlite" in targets:
        out["sqlite"] = migrate_sqlite(s.sqlite_path)
    if "d1" in targets:
        out["d1"] = _migrate_d1(s)
    for sink, applied in out.items():
        print(f"{sink}: {'applied ' + ', '.join(applied) if applied else 'up to date'}")
    return 0


def _migrate_d1(s: Settings) -> list[str]:
    from sluice.shared.migrations import migrate_d1
    from sluice.shared.sinks.d1 import D1Sink

    if s.d1_sink is None:
        raise SluiceError("sink 'd1' is not configured: add [sinks.d1] to the config", sink="d1")
    variable = s.d1_sink.api_token_env
    sink = D1Sink(s.d1_sink, lambda: s.secret(variable))
    try:
        return migrate_d1(sink.client())
    finally:
        sink.close()


MALLOC_ARENAS = 2  # for a threads-pool worker; see cap_malloc_arenas


def cap_malloc_arenas(n: int) -> bool:
    """Let glibc's malloc keep at most n arenas in this process (as MALLOC_ARENA_MAX=n would).

    By default each new thread that allocates gets an arena of its own, up to 8 per core, and
    freed memory stays spread over them. The SQLite writer's 16 threads each decode pages of
    different sizes, so its RSS kept growing with the run: 230.8 MB at 1M records, 247.8 MB at
    5M. With 2 arenas: 224.6 MB at 1M, 225.5 MB at 5M, at the same speed. Called before any
    worker thread starts; False where libc is not glibc."""
    import ctypes
    import ctypes.util

    m_arena_max = -8  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_arena_max, n))
    except (OSError, AttributeError):  # no libc by that name, or no mallopt (musl, macOS)
        return False


def cmd_worker(args: argparse.Namespace) -> int:
    from sluice.shared.celery_app import QUEUES, app

    if args.pool == "threads":
        cap_malloc_arenas(MALLOC_ARENAS)
    app.configure(_settings())
    queues = args.queues or ",".join(QUEUES)
    argv = ["worker", "-Q", queues, "-l", args.loglevel, "--without-gossip", "--without-mingle"]
    if args.autoscale:
        argv += ["--autoscale", args.autoscale]
    else:
        argv += ["-c", str(args.concurrency)]
    if args.hostname:
        argv += ["-n", args.hostname]
    if args.pool:
        argv += ["-P", args.pool]
    if args.include:
        argv += ["--include", args.include]
    if args.pool == "threads":
        # Each thread already holds a page; prefetching more per thread only adds decoded pages
        # waiting in memory (about 1.5 MB each at 1,000 records) for no gain in throughput.
        argv += ["--prefetch-multiplier", "1"]
    app.worker_main(argv)
    return 0


BEAT_LOCK_TIMEOUT = 30  # seconds: a standby beat takes over this long after the active one died
BEAT_MAX_LOOP_INTERVAL = 5  # seconds: the active beat extends the lock at least this often


def cmd_beat(args: argparse.Namespace) -> int:
    """The scheduler, via celery-redbeat: the schedule and a lock live in Redis, so however many
    `sluice beat` run, exactly one dispatches; the others wait on the lock (checking every
    BEAT_MAX_LOOP_INTERVAL s) and take over when it is released (a clean stop) or expires
    (BEAT_LOCK_TIMEOUT s after the active beat died). A beat that loses the lock exits: its
    supervisor restarts it, as a standby."""
    from sluice.producers.schedule import beat_schedule
    from sluice.shared.celery_app import app

    s = _settings()
    ctx = app.configure(s)
    schedule = beat_schedule(s)
    if not schedule:
        print("no source has a schedule in the config; nothing to run", file=sys.stderr)
        return 1
    redis_url = s.env.get("SLUICE_REDIS_URL") or ctx.broker_url
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise SluiceError(
            "sluice beat keeps its schedule and lock in Redis: set SLUICE_REDIS_URL when the"
            " broker is not Redis",
            broker=redis_url.split("://")[0],
        )
    app.conf.update(
        beat_schedule=schedule,
        beat_scheduler="redbeat.RedBeatScheduler",
        beat_max_loop_interval=args.max_loop_interval,
        redbeat_redis_url=redis_url,
        redbeat_redis_options={"socket_connect_timeout": 10, "health_check_interval": 30},
        redbeat_key_prefix="sluice:redbeat",
        redbeat_lock_timeout=args.lock_timeout,
    )
    app.Beat(loglevel=args.loglevel, scheduler="redbeat.RedBeatScheduler").run()
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from sluice.producers.produce import run_source
    from sluice.shared.celery_app import app

    ctx = app.configure(_settings())
    summary = run_source(ctx, args.source, max_batches=args.max_batches)
    if args.json:
        print(json.dumps(summary.as_dict()))
    else:
        print(
            f"{summary.source}: {summary.status}, {summary.pages} page(s), "
            f"{summary.records} record(s) in {summary.seconds}s"
            + (f" — {summary.error}" if summary.error else "")
        )
    return 0 if summary.status != "failed" else 1


def cmd_backfill(args: argparse.Namespace) -> int:
    from sluice.ops.backfill import parse_time, run_backfill
    from sluice.shared.celery_app import app

    ctx = app.configure(_settings())
    try:
        start, end = parse_time(args.start), parse_time(args.end)
    except ValueError as exc:
        print(f"sluice: backfill: {exc}", file=sys.stderr)
        return 2
    r = run_backfill(
        ctx,
        args.source,
        start,
        end,
        lambda m: print(m, file=sys.stderr),
        max_windows=args.max_windows,
    )
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        print(
            f"{r.source} {r.start}..{r.end}: {r.status}, {r.windows_done}/{r.windows_total}"
            f" window(s) done ({r.windows_this_run} this run), {r.pages} page(s),"
            f" {r.records} record(s)"
            + (f", {r.rejected} dead letter(s)" if r.rejected else "")
            + f" enqueued in {r.seconds}s"
            + (f" — {r.error}" if r.error else "")
        )
    # Non-zero when part of the range could not be fetched: a partition failed (`partial`,
    # `failed`) or was cut short (`incomplete`), or another backfill holds the source.
    ok = r.status in ("complete", "stopped") and not r.incomplete and not r.failed
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from sluice.ops.status import build_status, format_status
    from sluice.shared.celery_app import app

    ctx = app.configure(_settings())
    doc = build_status(ctx, app, timeout=args.timeout)
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        print(format_status(doc))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from sluice.ops.reconcile import format_report, reconcile

    doc = reconcile(_settings(), args.source, sample=args.sample, seed=args.seed, limit=args.limit)
    print(json.dumps(doc, default=str) if args.json else format_report(doc))
    return 0 if doc["ok"] else 1


def cmd_scale(args: argparse.Namespace) -> int:
    from sluice.ops.scale import format_results, parse_autoscale, scale
    from sluice.shared.celery_app import app

    app.configure(_settings())
    results = scale(
        app,
        grow=args.grow,
        shrink=args.shrink,
        set_to=args.set_to,
        autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
        nodes=args.node,
        timeout=args.timeout,
        wait=args.wait,
    )
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    else:
        print(format_results(results))
    return 0 if all(r.ok for r in results) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from sluice.ops.serve import serve
    from sluice.shared.celery_app import app

    ctx = app.configure(_settings())
    serve(ctx, app, args.host, args.port, inspect_timeout=args.timeout)
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from sluice.shared.celery_app import app

    auth = os.environ.get("SLUICE_FLOWER_AUTH", "").strip()
    if auth and not all(
        user and password for user, _, password in (a.partition(":") for a in auth.split(","))
    ):
        print(
            "sluice: SLUICE_FLOWER_AUTH must be user:password (several: comma-separated)",
            file=sys.stderr,
        )
        return 2
    if not auth and not args.no_auth:
        print(
            "sluice: refusing to start Flower without authentication: set"
            " SLUICE_FLOWER_AUTH=user:password, or pass --no-auth (anyone who can reach the port"
            " can then see task arguments and resize or shut down workers)",
            file=sys.stderr,
        )
        return 2
    if args.no_auth:
        print(
            f"sluice: WARNING: Flower on {args.address}:{args.port} without authentication",
            file=sys.stderr,
        )
    app.configure(_settings())
    # In-process, so the broker URL and the password never appear in argv (`ps`).
    argv = ["flower", f"--port={args.port}", f"--address={args.address}"]
    if auth:
        argv.append(f"--basic-auth={auth}")
    broker_api = os.environ.get("SLUICE_FLOWER_BROKER_API")
    if broker_api:  # RabbitMQ management API, for queue lengths on an amqp broker
        argv.append(f"--broker-api={broker_api}")
    if args.url_prefix:
        argv.append(f"--url-prefix={args.url_prefix}")
    code = app.start(argv)
    return int(code or 0)


def cmd_services(args: argparse.Namespace) -> int:
    from sluice.shared.embedded import ensure_postgres, ensure_redis, service_status, stop_services

    s = _settings()
    if args.action == "stop":
        stopped = stop_services(s.data_dir)
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
    elif args.action == "start":
        print(f"redis: {ensure_redis(s.data_dir)}")
        print(f"postgres: {ensure_postgres(s.data_dir)}")
    else:
        for name, url in service_status(s.data_dir).items():
            print(f"{name}: {url or 'not running'}")
    return 0


def _dlq_filters(args: argparse.Namespace) -> Any:
    from sluice.ops.dlq import Filters

    return Filters(
        ids=args.ids or None,
        stream=args.stream,
        sink=args.sink,
        error=args.error,
        source=args.source,
        since=args.since,
        status=None if args.status == "all" else args.status,
        limit=args.limit,
    )


def cmd_dlq(args: argparse.Namespace) -> int:
    from sluice.ops import dlq
    from sluice.shared.celery_app import app

    ctx = app.configure(_settings())
    if args.action == "show":
        row = dlq.show_letter(ctx.state, args.id)
        print(json.dumps(row, default=str, indent=2))
        return 0
    f = _dlq_filters(args)
    if args.action == "list":
        rows = dlq.list_letters(ctx.state, f)
        print(json.dumps(rows, default=str) if args.json else dlq.format_table(rows))
    elif args.action == "replay":
        r = dlq.replay(ctx, f, dry_run=args.dry_run)
        verb = "would replay" if args.dry_run else "replayed"
        print(
            f"{verb} {r.records} record(s) in {r.pages} page(s)"
            + (f"; {r.skipped} not replayable (unreadable messages)" if r.skipped else "")
        )
    elif args.action == "discard":
        print(f"discarded {dlq.discard(ctx.state, f)} dead letter(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sluice.ops.demo import run_demo

    data_dir = Path(args.data_dir or os.environ.get("SLUICE_DATA_DIR") or ".sluice/demo")
    started_here = not (
        os.environ.get("SLUICE_BROKER_URL") and os.environ.get("SLUICE_POSTGRES_URL")
    )
    say = (lambda m: print(m, file=sys.stderr)) if not args.json else None
    try:
        r = run_demo(args.records, data_dir, args.workers, args.page_size, progress=say)
    finally:
        if started_here and not args.keep_services:
            from sluice.shared.embedded import stop_services

            stop_services(data_dir.resolve())
    doc: dict[str, Any] = {
        "fetched": r.fetched,
        "inserted": r.inserted,
        "duplicates": r.duplicates,
        "dead_letters": r.dead_letters,
        "seconds": r.seconds,
        "records_per_second": r.records_per_second,
        "sinks": r.sinks,
        "data": r.data,
    }
    if args.json:
        print(json.dumps(doc))
        return 0
    print()
    print(f"{'':<12}{'fetched':>10}{'inserted':>10}{'duplicates':>12}{'dead letters':>14}")
    print(f"{'pipeline':<12}{r.fetched:>10}{r.inserted:>10}{r.duplicates:>12}{r.dead_letters:>14}")
    for sink, c in r.sinks.items():
        print(f"{sink:<12}{'':>10}{c['inserted']:>10}{c['duplicates']:>12}{c['invalid']:>14}")
    print(f"\n{r.fetched} records in {r.seconds}s: {r.records_per_second} records/s")
    for k, v in r.data.items():
        print(f"{k:<12} {v}")
    if started_here and not args.keep_services:
        print("(embedded servers stopped; `sluice demo --keep-services` leaves them running)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sluice.ops.bench import format_result, run_bench

    data_dir = Path(args.data_dir or ".sluice/bench")
    say = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda _m: None)
    results = []
    try:
        for sink in args.sink or ["postgres", "sqlite"]:
            results.append(
                run_bench(
                    sink,
                    args.records,
                    args.page_size,
                    args.workers,
                    args.runs,
                    args.naive_records,
                    data_dir,
                    say,
                    args.pool,
                    args.prefill,
                )
            )
    finally:
        if not args.keep_services:
            from sluice.shared.embedded import stop_services

            stop_services(data_dir.resolve())
    if args.json:
        doc = {r.sink: r.as_dict() for r in results}
        print(json.dumps(doc if len(results) > 1 else results[0].as_dict()))
    else:
        print("\n\n".join(format_result(r) for r in results))
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on sample data, offline")
    demo.add_argument("--records", type=int, default=200_000)
    demo.add_argument("--workers", type=int, default=2, help="PostgreSQL worker concurrency")
    demo.add_argument("--page-size", type=int, default=1000)
    demo.add_argument("--data-dir")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--keep-services", action="store_true")
    demo.set_defaults(func=cmd_demo)

    cfg = sub.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    check = cfg_sub.add_parser("check", help="validate the config file and name each mistake")
    check.add_argument("file", nargs="?")
    check.add_argument(
        "--online",
        action="store_true",
        help="also open each D1 source and check its columns against the table",
    )
    check.set_defaults(func=cmd_config_check)

    mig = sub.add_parser("migrate", help="apply pending schema migrations")
    mig.add_argument("--sink", action="append", choices=list(SINK_NAMES))
    mig.set_defaults(func=cmd_migrate)

    w = sub.add_parser("worker", help="run a Celery worker on our queues")
    w.add_argument("--queues", help="comma-separated (default: all)")
    w.add_argument("--concurrency", "-c", type=int, default=2)
    w.add_argument("--autoscale", help="MAX,MIN")
    w.add_argument("--hostname", "-n")
    w.add_argument("--pool", "-P")
    w.add_argument("--loglevel", "-l", default="INFO")
    w.add_argument("--include", help="extra task modules to load (comma-separated)")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("beat", help="run the scheduler for the sources' schedules")
    b.add_argument("--loglevel", "-l", default="INFO")
    b.add_argument(
        "--lock-timeout",
        type=_positive,
        default=BEAT_LOCK_TIMEOUT,
        help=f"seconds before a standby beat takes over (default {BEAT_LOCK_TIMEOUT})",
    )
    b.add_argument(
        "--max-loop-interval",
        type=_positive,
        default=BEAT_MAX_LOOP_INTERVAL,
        help=f"seconds between lock renewals (default {BEAT_MAX_LOOP_INTERVAL})",
    )
    b.set_defaults(func=cmd_beat)

    pr = sub.add_parser("produce", help="run one source once, now")
    pr.add_argument("source")
    pr.add_argument("--max-batches", type=int)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_produce)

    bf = sub.add_parser(
        "backfill", help="fetch a past range of an HTTP source again (resumable; keyed writes)"
    )
    bf.add_argument("source")
    bf.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="ISO",
        help="start of the range, e.g. 2024-01-01 or 2024-01-01T00:00:00Z",
    )
    bf.add_argument("--to", dest="end", required=True, metavar="ISO", help="end (exclusive)")
    bf.add_argument(
        "--max-windows",
        type=_positive,
        metavar="N",
        help="stop after N windows (run again to continue)",
    )
    bf.add_argument("--json", action="store_true")
    bf.set_defaults(func=cmd_backfill)

    st = sub.add_parser(
        "status", help="queues (waiting + unacked), dead letters, sources' lag and runs, workers"
    )
    st.add_argument("--json", action="store_true")
    st.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="seconds to wait for workers to answer (default 1)",
    )
    st.set_defaults(func=cmd_status)

    rc = sub.add_parser(
        "reconcile",
        help="compare a D1 or KV source with every sink its streams write to (exit 1: mismatch)",
    )
    rc.add_argument("source")
    rc.add_argument(
        "--sample",
        type=_non_negative,
        default=100,
        metavar="N",
        help="keys per stream compared field by field (default 100; 0: none)",
    )
    rc.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    rc.add_argument(
        "--limit",
        type=_positive,
        default=20,
        metavar="N",
        help="keys listed per problem (default 20; totals are always complete)",
    )
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=cmd_reconcile)

    sc = sub.add_parser("scale", help="resize running workers' pools (Celery remote control)")
    size = sc.add_mutually_exclusive_group(required=True)
    size.add_argument("--grow", type=_positive, metavar="N", help="add N pool processes")
    size.add_argument("--shrink", type=_positive, metavar="N", help="remove N pool processes")
    size.add_argument(
        "--set", type=_positive, metavar="N", dest="set_to", help="resize each node to N processes"
    )
    size.add_argument(
        "--autoscale", metavar="MAX,MIN", help="change the range of nodes started with --autoscale"
    )
    sc.add_argument(
        "--node",
        action="append",
        metavar="NAME",
        help="worker node, e.g. pg@host (repeatable; default: every worker)",
    )
    sc.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="seconds to wait for workers to answer (default 1)",
    )
    sc.add_argument(
        "--wait",
        type=float,
        default=15.0,
        help="seconds to wait for the new sizes to show (default 15)",
    )
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_scale)

    se = sub.add_parser("serve", help="HTTP: /metrics (Prometheus), /health, /status")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=9808, help="default 9808; 0 picks a free port")
    se.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="seconds /status waits for workers to answer (default 1)",
    )
    se.set_defaults(func=cmd_serve)

    fl = sub.add_parser("flower", help="Flower (web UI) on our broker; auth: $SLUICE_FLOWER_AUTH")
    fl.add_argument("--port", type=int, default=5555)
    fl.add_argument("--address", default="127.0.0.1")
    fl.add_argument("--url-prefix", help="when served behind a reverse proxy under a path")
    fl.add_argument(
        "--no-auth", action="store_true", help="start without SLUICE_FLOWER_AUTH (not recommended)"
    )
    fl.set_defaults(func=cmd_flower)

    be = sub.add_parser("bench", help="measure the pipeline against the database's limit")
    be.add_argument("--sink", action="append", choices=["postgres", "sqlite"])
    be.add_argument("--records", type=int, default=1_000_000)
    be.add_argument("--page-size", type=int, default=1000)
    be.add_argument("--workers", type=int, default=2, help="PostgreSQL worker concurrency")
    be.add_argument("--runs", type=int, default=3, help="the figures are medians of this many")
    be.add_argument("--naive-records", type=int, default=20_000)
    be.add_argument(
        "--pool",
        choices=["solo", "prefork", "threads"],
        default="solo",
        help="worker layout: --workers solo processes, or one prefork/threads worker of that size",
    )
    be.add_argument(
        "--prefill",
        type=int,
        default=0,
        metavar="N",
        help="rows already in the sink's table before each limit and pipeline run",
    )
    be.add_argument("--data-dir", help="its own embedded servers live here (.sluice/bench)")
    be.add_argument("--json", action="store_true")
    be.add_argument("--keep-services", action="store_true")
    be.set_defaults(func=cmd_bench)

    dl = sub.add_parser("dlq", help="dead letters: list, show, replay, discard")
    dl_sub = dl.add_subparsers(dest="action", required=True)
    show = dl_sub.add_parser("show", help="one dead letter with its payload and error")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_dlq)
    for name, text in (
        ("list", "dead letters as a table"),
        ("replay", "re-enqueue as pages; never duplicates"),
        ("discard", "mark as discarded"),
    ):
        a = dl_sub.add_parser(name, help=text)
        a.add_argument("ids", nargs="*", type=int, help="dead letter ids (default: by filter)")
        a.add_argument("--stream")
        a.add_argument(
            "--sink",
            choices=[*SINK_NAMES, "source"],
            help="the sink that refused the record, or 'source' (an item a source could not read)",
        )
        a.add_argument("--error", help="substring of the error class or message")
        a.add_argument("--source")
        a.add_argument("--since", help="ISO time or relative: 30m, 2h, 7d")
        a.add_argument(
            "--status", default="pending", choices=["pending", "replayed", "discarded", "all"]
        )
        a.add_argument("--limit", type=int)
        if name == "list":
            a.add_argument("--json", action="store_true")
        if name == "replay":
            a.add_argument("--dry-run", action="store_true")
        a.set_defaults(func=cmd_dlq)

    sv = sub.add_parser("services", help="the embedded Redis and PostgreSQL of the data folder")
    sv.add_argument("action", choices=["start", "stop", "status"])
    sv.set_defaults(func=cmd_services)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    from sluice.producers.registry import open_source
    from sluice.shared.celery_app import app

    app.use_sources(open_source)  # workers and commands acknowledge pages to their sources
    try:
        return int(args.func(args))
    except SluiceError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `sluice` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from shared.errors import SluiceError
from shared.settings import Settings


def _settings() -> Settings:
    return Settings.load()


def cmd_config_check(args: argparse.Namespace) -> int:
    if args.file:
        os.environ["SLUICE_CONFIG"] = args.file
    s = _settings()
    where = s.config_path or "<no config file: defaults>"
    print(f"{where}: OK — {len(s.sources)} source(s), {len(s.streams)} stream(s)")
    for name, src in s.sources.items():
        sched = src.schedule.model_dump(exclude_none=True) if src.schedule else "manual"
        print(f"  source {name}: {src.kind} {src.mode} → {src.stream} (schedule: {sched})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from shared.database import postgres_url
    from shared.migrations import migrate_postgres, migrate_sqlite

    s = _settings()
    targets = args.sink or ["postgres", "sqlite"]
    out: dict[str, list[str]] = {}
    if "postgres" in targets:
        out["postgres"] = migrate_postgres(postgres_url(s))
    if "sqlite" in targets:
        out["sqlite"] = migrate_sqlite(s.sqlite_path)
    for sink, applied in out.items():
        print(f"{sink}: {'applied ' + ', '.join(applied) if applied else 'up to date'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from shared.celery_app import QUEUES, app

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
    app.worker_main(argv)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from producers.schedule import beat_schedule
    from shared.celery_app import app

    s = _settings()
    app.configure(s)
    app.conf.beat_schedule = beat_schedule(s)
    if not app.conf.beat_schedule:
        print("no source has a schedule in the config; nothing to run", file=sys.stderr)
        return 1
    s.data_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(loglevel=args.loglevel, schedule=str(s.data_dir / "beat-schedule")).run()
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from producers.produce import run_source
    from shared.celery_app import app

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


def cmd_status(args: argparse.Namespace) -> int:
    from ops.status import format_depths, queue_depths
    from shared.celery_app import app

    ctx = app.configure(_settings())
    depths = queue_depths(ctx.redis)
    if args.json:
        print(json.dumps({"queues": depths}))
    else:
        print(format_depths(depths))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from shared.embedded import ensure_postgres, ensure_redis, service_status, stop_services

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
    from ops.dlq import Filters

    return Filters(
        ids=args.ids or None, stream=args.stream, sink=args.sink, error=args.error,
        source=args.source, since=args.since,
        status=None if args.status == "all" else args.status, limit=args.limit,
    )


def cmd_dlq(args: argparse.Namespace) -> int:
    from ops import dlq
    from shared.celery_app import app

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
        print(f"{verb} {r.records} record(s) in {r.pages} page(s)"
              + (f"; {r.skipped} not replayable (unreadable messages)" if r.skipped else ""))
    elif args.action == "discard":
        print(f"discarded {dlq.discard(ctx.state, f)} dead letter(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ops.demo import run_demo

    data_dir = Path(args.data_dir or os.environ.get("SLUICE_DATA_DIR") or ".sluice/demo")
    started_here = not (
        os.environ.get("SLUICE_BROKER_URL") and os.environ.get("SLUICE_POSTGRES_URL")
    )
    say = (lambda m: print(m, file=sys.stderr)) if not args.json else None
    try:
        r = run_demo(args.records, data_dir, args.workers, args.page_size, progress=say)
    finally:
        if started_here and not args.keep_services:
            from shared.embedded import stop_services

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
    check.set_defaults(func=cmd_config_check)

    mig = sub.add_parser("migrate", help="apply pending schema migrations")
    mig.add_argument("--sink", action="append", choices=["postgres", "sqlite"])
    mig.set_defaults(func=cmd_migrate)

    w = sub.add_parser("worker", help="run a Celery worker on our queues")
    w.add_argument("--queues", help="comma-separated (default: all)")
    w.add_argument("--concurrency", "-c", type=int, default=2)
    w.add_argument("--autoscale", help="MAX,MIN")
    w.add_argument("--hostname", "-n")
    w.add_argument("--pool", "-P")
    w.add_argument("--loglevel", "-l", default="INFO")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("beat", help="run the scheduler for the sources' schedules")
    b.add_argument("--loglevel", "-l", default="INFO")
    b.set_defaults(func=cmd_beat)

    pr = sub.add_parser("produce", help="run one source once, now")
    pr.add_argument("source")
    pr.add_argument("--max-batches", type=int)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_produce)

    st = sub.add_parser("status", help="queue depths (waiting + unacked)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    dl = sub.add_parser("dlq", help="dead letters: list, show, replay, discard")
    dl_sub = dl.add_subparsers(dest="action", required=True)
    show = dl_sub.add_parser("show", help="one dead letter with its payload and error")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_dlq)
    for name, text in (("list", "dead letters as a table"),
                       ("replay", "re-enqueue as pages; never duplicates"),
                       ("discard", "mark as discarded")):
        a = dl_sub.add_parser(name, help=text)
        a.add_argument("ids", nargs="*", type=int, help="dead letter ids (default: by filter)")
        a.add_argument("--stream")
        a.add_argument("--sink", choices=["postgres", "sqlite"])
        a.add_argument("--error", help="substring of the error class or message")
        a.add_argument("--source")
        a.add_argument("--since", help="ISO time or relative: 30m, 2h, 7d")
        a.add_argument("--status", default="pending",
                       choices=["pending", "replayed", "discarded", "all"])
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
    try:
        return int(args.func(args))
    except SluiceError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

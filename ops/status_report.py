"""What `sluice status` found, as data, and the one screen it prints.

ops/status.py gathers a StatusReport; this module only shapes it: `as_dict()` is the JSON
document (`sluice status --json`, `/status`), `render_status` the text. Neither reads anything,
so a report made by hand (a test, a web console's cache) renders the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sluice.ops.workers import role_of
from sluice.producers.source import SourceStatus


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


@dataclass(frozen=True)
class QueueDepth:
    """A queue's pages: waiting in the broker, and delivered to a worker but not acknowledged
    (still work to do). `unacked` is None where the broker does not tell (RabbitMQ without its
    management API)."""

    waiting: int
    unacked: int | None
    total: int

    def as_dict(self) -> dict[str, int | None]:
        return {"waiting": self.waiting, "unacked": self.unacked, "total": self.total}


@dataclass(frozen=True)
class DeadLetterGroup:
    """Pending dead letters of one stream, sink and error class."""

    stream: str
    sink: str
    error_class: str
    count: int
    oldest: datetime | None
    newest: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "sink": self.sink,
            "error_class": self.error_class,
            "count": self.count,
            "oldest": _iso(self.oldest),
            "newest": _iso(self.newest),
        }


@dataclass(frozen=True)
class LastRun:
    """A source's latest run (`source_runs`), and how many of its runs failed in the last day."""

    run_id: str
    status: str
    pages: int
    records: int
    started_at: datetime | None
    seconds: float | None
    error: str | None
    failed_last_24h: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "pages": self.pages,
            "records": self.records,
            "started_at": _iso(self.started_at),
            "seconds": self.seconds,
            "error": self.error,
            "failed_last_24h": self.failed_last_24h,
        }


@dataclass
class SourceReport:
    """One configured source: what every kind has (commits, pages in flight, runs) and what its
    kind told about itself (`own`; None when the source could not be opened, see `errors`)."""

    name: str
    kind: str
    stream: str
    own: SourceStatus | None = None
    lag_seconds: float | None = None
    newest_record: datetime | None = None  # lag from the stream: its newest event time
    future_times: str | None = None  # an event time ahead of the clock, said in words
    last_commit: datetime | None = None
    last_commit_seconds_ago: float | None = None
    pages_in_flight: int | None = None
    oldest_in_flight_seconds: float | None = None
    last_run: LastRun | None = None
    # Seconds since the oldest item still to process (0: caught up; None: unknown).
    backlog_age_seconds: float | None = None
    # Why the runs are unknown ("postgres unreachable"), rather than "never ran".
    runs_unknown: str | None = None
    # What could not be read of this source, by fact: shown with it, and a problem.
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether the source's latest run failed."""
        return self.last_run is not None and self.last_run.status == "failed"

    @property
    def unknown(self) -> dict[str, str]:
        """Facts this process cannot know (no API token here), with why: not a problem."""
        return dict(self.own.unknown) if self.own is not None else {}

    @property
    def unprocessed(self) -> int | None:
        return self.own.unprocessed if self.own is not None else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "stream": self.stream}
        lag_from = None
        if self.own is not None:
            out.update(self.own.facts())
            lag_from = self.own.lag_from
        # Only a kind that has a lag shows one; the stream's newest event time is the lag of a
        # source that owns its stream, its own cursors that of one sharing the stream.
        if lag_from is not None:
            out["lag_seconds"] = self.lag_seconds
        if lag_from == "stream":
            out["newest_record"] = _iso(self.newest_record)
            if self.future_times:
                out["future_times"] = self.future_times
        out.update(
            backlog_age_seconds=self.backlog_age_seconds,
            oldest_unprocessed=_iso(self.own.oldest_unprocessed) if self.own else None,
            last_commit=_iso(self.last_commit),
            last_commit_seconds_ago=self.last_commit_seconds_ago,
            pages_in_flight=self.pages_in_flight,
            oldest_in_flight_seconds=self.oldest_in_flight_seconds,
            last_run=self.last_run.as_dict() if self.last_run else None,
            runs_unknown=self.runs_unknown,
            errors=dict(self.errors),
            unknown=self.unknown,
        )
        return out


@dataclass(frozen=True)
class WorkerReport:
    """A worker answering remote control: its live pool size and what it consumes."""

    concurrency: int | None
    max_concurrency: int | None  # the size it started with
    autoscale: tuple[int | None, int | None] | None  # (min, max) when it autoscales
    pool: str | None
    queues: list[str]
    pid: int | None
    uptime_seconds: float | None
    tasks: int
    role: str = ""  # the node's name before @ (see ops/workers.py)

    def as_dict(self) -> dict[str, Any]:
        auto = self.autoscale
        return {
            "role": self.role,
            "concurrency": self.concurrency,
            "max_concurrency": self.max_concurrency,
            "autoscale": {"max": auto[1], "min": auto[0]} if auto else None,
            "pool": self.pool,
            "queues": self.queues,
            "pid": self.pid,
            "uptime_seconds": self.uptime_seconds,
            "tasks": self.tasks,
        }


@dataclass
class StatusReport:
    """The state of the pipeline. A part that could not be read is None, and why is under
    `errors` by part name (`postgres`, `queues`, `commit:SOURCE`, …); the other parts stand."""

    time: datetime
    broker: str  # "redis" or "amqp" (or the URL's scheme)
    state: str  # where runs, cursors and dead letters live: "postgres" or "sqlite"
    queues: dict[str, QueueDepth] | None = None
    dead_letters: list[DeadLetterGroup] | None = None
    sources: dict[str, SourceReport] = field(default_factory=dict)
    workers: dict[str, WorkerReport] | None = None
    errors: dict[str, str] = field(default_factory=dict)
    # Stores that could not be reached, by name ("postgres", "redis", "sqlite"), with why.
    unreachable: dict[str, str] = field(default_factory=dict)
    # The queues the configuration needs a worker on (None: not known).
    queues_needed: list[str] | None = None
    # The latest prune of each target (`sluice prune`), by target; None: not read.
    prunes: dict[str, dict[str, Any]] | None = None

    @property
    def dead_letters_pending(self) -> int | None:
        if self.dead_letters is None:
            return None
        return sum(d.count for d in self.dead_letters)

    def _explained(self) -> set[str]:
        """Parts of `errors` already said by an unreachable store."""
        parts = set(self.unreachable)
        if self.broker_name in self.unreachable:
            parts |= {"queues", "workers"}
        if self.state in self.unreachable:
            parts |= {"state", "dead_letters"}
        return parts

    def source_errors(self, source: SourceReport) -> dict[str, str]:
        """What could not be read of `source`, less what an unreachable store explains (its
        pages in flight, kept in the Redis broker)."""
        explained = (
            {"in_flight"} if self.broker == "redis" and "redis" in self.unreachable else set()
        )
        return {f: m for f, m in source.errors.items() if f not in explained}

    @property
    def broker_name(self) -> str:
        """The broker as an operator names it: redis, rabbitmq, …"""
        return "rabbitmq" if self.broker == "amqp" else self.broker

    def unknown_because(self, *stores: str) -> str | None:
        """Why a part is unknown ("postgres unreachable"), when one of `stores` is down."""
        down = [s for s in stores if s in self.unreachable]
        return f"{', '.join(down)} unreachable" if down else None

    def consumers(self, queue: str) -> list[str]:
        """The workers online that consume `queue`."""
        return sorted(n for n, w in (self.workers or {}).items() if queue in w.queues)

    @property
    def roles(self) -> dict[str, list[str]]:
        """Workers online by role: role → node names."""
        out: dict[str, list[str]] = {}
        for node, w in sorted((self.workers or {}).items()):
            out.setdefault(w.role or role_of(node), []).append(node)
        return dict(sorted(out.items()))

    @property
    def problems(self) -> list[str]:
        """What is wrong, one line each: a store unreachable, a part that could not be read, a
        source whose last run failed, dead letters pending, a queue no worker consumes."""
        out = [f"{store} unreachable" for store in self.unreachable]
        explained = self._explained()
        out += [f"cannot read {part}" for part in self.errors if part not in explained]
        for name, s in self.sources.items():
            if s.failed:
                out.append(f"source {name}: last run failed")
            out += [f"source {name}: cannot read {fact}" for fact in self.source_errors(s)]
        pending = self.dead_letters_pending
        if pending:
            out.append(f"{pending} dead letters pending")
        if self.workers is not None:
            waiting = {q: d.total for q, d in (self.queues or {}).items() if d.total}
            for q in sorted(set(self.queues_needed or ()) | set(waiting)):
                if not self.consumers(q):
                    held = f" ({waiting[q]} pages waiting)" if q in waiting else ""
                    out.append(f"no worker consumes {q}{held}")
        return out

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (`problems` is empty)."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """The JSON document: `sluice status --json` and `/status`."""
        return {
            "time": self.time.isoformat(timespec="seconds"),
            "broker": self.broker,
            "state": self.state,
            "queues": {q: d.as_dict() for q, d in self.queues.items()}
            if self.queues is not None
            else None,
            "dead_letters": {
                "pending": self.dead_letters_pending,
                "by_stream": [d.as_dict() for d in self.dead_letters]
                if self.dead_letters is not None
                else None,
            },
            "sources": {name: s.as_dict() for name, s in self.sources.items()},
            "workers": {node: w.as_dict() for node, w in self.workers.items()}
            if self.workers is not None
            else None,
            "roles": self.roles if self.workers is not None else None,
            "queues_needed": self.queues_needed,
            "unreachable": dict(self.unreachable),
            "prunes": {
                target: {**p, "started_at": _iso(p.get("started_at"))}
                for target, p in self.prunes.items()
            }
            if self.prunes is not None
            else None,
            "errors": dict(self.errors),
            "problems": self.problems,
            "ok": self.ok,
        }


# -- the screen ------------------------------------------------------------------------------


def render_status(report: StatusReport) -> str:
    """The report on one screen. Ages ("3s ago") are counted to the report's time."""
    parts = [_queues(report), _dead_letters(report), _sources(report), _workers(report)]
    if report.prunes:
        parts.append(_prunes(report))
    problems = report.problems
    if problems:
        parts.append("\n".join(["problems:", *(f"  {p}" for p in problems)]))
    if report.errors:
        parts.append(_errors(report.errors))
    return "\n\n".join(parts)


def ago(seconds: float | None) -> str:
    """A duration as a short age: 42s, 3m05s, 4h12m, 365d22h."""
    if seconds is None:
        return "—"
    s = int(abs(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


def _age(report: StatusReport, then: datetime | None) -> str:
    return ago((report.time - then).total_seconds()) if then is not None else "—"


def _queues(report: StatusReport) -> str:
    if report.queues is None:
        return f"queues: {_unknown(report, report.broker_name)}"
    lines = [f"{'queue':<18}{'waiting':>10}{'unacked':>10}{'total':>10}"]
    for q, d in report.queues.items():
        unacked = "?" if d.unacked is None else d.unacked
        lines.append(f"{q:<18}{d.waiting:>10}{unacked:>10}{d.total:>10}")
    if report.broker == "amqp":
        lines.append("  (RabbitMQ: unacked is only visible in the management UI/API)")
    return "\n".join(lines)


def _unknown(report: StatusReport, *stores: str) -> str:
    """ "unknown: postgres unreachable" when a store it needs is down, else "unavailable"."""
    why = report.unknown_because(*stores)
    return f"unknown: {why}" if why else "unavailable"


def _dead_letters(report: StatusReport) -> str:
    if report.dead_letters is None:
        return f"dead letters pending: {_unknown(report, report.state)}"
    lines = [f"dead letters pending: {report.dead_letters_pending}"]
    if report.dead_letters:
        lines.append(f"  {'stream':<22}{'sink':<10}{'error':<26}{'count':>7}  newest")
        for d in report.dead_letters:
            lines.append(
                f"  {d.stream:<22}{d.sink:<10}{d.error_class:<26}{d.count:>7}"
                f"  {_age(report, d.newest)} ago"
            )
    return "\n".join(lines)


def _sources(report: StatusReport) -> str:
    lines = [f"sources ({len(report.sources)})"]
    if report.sources:
        lines.append(
            f"  {'source':<18}{'age':>9}{'commit':>9}{'backlog':>9}{'flight':>7}  last run"
        )
    for name, s in report.sources.items():
        backlog = "—" if s.unprocessed is None else s.unprocessed
        flight = "—" if s.pages_in_flight is None else s.pages_in_flight
        lines.append(
            f"  {name:<18}{ago(s.backlog_age_seconds):>9}{ago(s.last_commit_seconds_ago):>9}"
            f"{backlog!s:>9}{flight!s:>7}  {_run_text(report, s)}"
        )
    return "\n".join(lines)


def _run_text(report: StatusReport, s: SourceReport) -> str:
    run = s.last_run
    if run is None and s.runs_unknown:
        text = f"unknown: {s.runs_unknown}"
    elif run is None:
        text = "never ran"
    else:
        took = f" in {run.seconds}s" if run.seconds is not None else ""
        text = (
            f"{run.status} {_age(report, run.started_at)} ago: {run.pages} pages, "
            f"{run.records} records{took}"
        )
        if run.failed_last_24h:
            text += f"; {run.failed_last_24h} failed in 24h"
        if run.status != "skipped" and run.error:  # failed, or an anomaly
            text += f" — {run.error[:60]}"
    if s.future_times:
        text += f"; {s.future_times}"
    own = s.own.summary() if s.own is not None else None
    if own:
        text += f"; {own}"
    for why in dict.fromkeys(s.unknown.values()):  # each reason once
        text += f"; unknown here: {why}"
    for fact, msg in report.source_errors(s).items():
        first = msg.splitlines()[0] if msg else ""
        text += f"; cannot read {fact}: {first[:80]}"
    return text


def _workers(report: StatusReport) -> str:
    if report.workers is None:
        return f"workers: {_unknown(report, report.broker_name)}"
    lines = [f"workers online: {len(report.workers)}"]
    if report.workers:
        lines.append(f"  {'role':<10}{'node':<32}{'pool':<28}queues")
    for role, nodes in report.roles.items():
        for node in nodes:
            w = report.workers[node]
            kind = (w.pool or "?").split(":", 1)[0].rsplit(".", 1)[-1]  # prefork, thread, …
            size = f"{kind} {w.concurrency}"
            if w.autoscale:
                size += f" (autoscale {w.autoscale[0]}..{w.autoscale[1]})"
            lines.append(f"  {role:<10}{node:<32}{size:<28}{','.join(w.queues)}")
    return "\n".join(lines)


def _prunes(report: StatusReport) -> str:
    """The latest prune of each target: when, what it deleted and kept, and why it kept."""
    lines = ["last prunes"]
    for target, p in (report.prunes or {}).items():
        took = f" in {p['seconds']}s" if p.get("seconds") is not None else ""
        text = (
            f"{p['status']} {_age(report, p.get('started_at'))} ago: {p['deleted']} deleted,"
            f" {p['kept']} kept{took}"
        )
        if p.get("note"):
            text += f" — {str(p['note'])[:80]}"
        lines.append(f"  {target:<24}{text}")
    return "\n".join(lines)


def _errors(errors: dict[str, str]) -> str:
    lines = ["errors:"]
    for part, msg in errors.items():
        first = msg.splitlines()[0] if msg else ""
        lines.append(f"  {part}: {first[:160]}")
    return "\n".join(lines)

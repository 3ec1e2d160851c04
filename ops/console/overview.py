"""The overview page's data: the status report, the sinks' figures, the operators' pauses and
the pending dead letters per class, gathered side by side."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sluice.ops import dlq
from sluice.ops.console.app import Console
from sluice.ops.stats import Stats
from sluice.ops.status_report import SourceReport, StatusReport
from sluice.shared.controls import Control, controls
from sluice.shared.settings import Schedule


def schedule_text(schedule: Schedule | None) -> str:
    if schedule is None:
        return "not scheduled"
    if schedule.every is not None:
        return f"every {schedule.every:g} s"
    return f"cron {schedule.cron}"


@dataclass
class SourceRow:
    """A source as the overview and the sources page list it."""

    name: str
    kind: str
    mode: str | None
    stream: str
    schedule: str
    paused: Control | None
    report: SourceReport | None

    @property
    def behind(self) -> str | None:
        """What measures how far behind it is: rows not processed yet, or its cursor's age."""
        if self.report is None:
            return None
        if self.report.unprocessed is not None:
            return f"{self.report.unprocessed:,} rows unprocessed"
        own = self.report.own
        if own is not None and own.cursors:
            return f"cursor {min(own.cursors.values()).strftime('%Y-%m-%d %H:%M:%S')}"
        return None


def source_rows(
    console: Console, report: StatusReport | None, paused: dict[str, Control]
) -> list[SourceRow]:
    rows = []
    for name, cfg in sorted(console.ctx.settings.sources.items()):
        control = paused.get(name)
        rows.append(
            SourceRow(
                name=name,
                kind=cfg.kind,
                mode=getattr(cfg, "mode", None),
                stream=", ".join(cfg.streams),
                schedule=schedule_text(cfg.schedule),
                paused=control if control is not None and control.paused else None,
                report=report.sources.get(name) if report is not None else None,
            )
        )
    return rows


def _paused(console: Console) -> dict[str, Control]:
    return controls(console.store)


def overview_data(console: Console) -> dict[str, Any]:
    errors: dict[str, str] = {}

    def part(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}".strip()
            return None

    with ThreadPoolExecutor(3) as pool:
        f_stats = pool.submit(part, "stats", console.stats)
        f_paused = pool.submit(part, "controls", lambda: _paused(console))
        f_groups = pool.submit(
            part, "dead letters", lambda: dlq.error_groups(console.store, dlq.Filters())
        )
        report: StatusReport = console.status()
        stats: Stats | None = f_stats.result()
        paused: dict[str, Control] = f_paused.result() or {}
        groups = f_groups.result()
    if stats is not None:
        errors.update({f"stats:{k}": v for k, v in stats.errors.items()})
    errors.update(report.errors)
    return {
        "report": report,
        "sources": source_rows(console, report, paused),
        "stats": stats,
        "groups": groups,
        "errors": errors,
        "refresh": 10,
    }

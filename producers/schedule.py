"""The beat schedule: one `sluice.produce` entry per source that has a schedule in the config."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from sluice.shared.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, src in settings.sources.items():
        if src.schedule is None:
            continue
        when: Any
        if src.schedule.every is not None:
            when = src.schedule.every
        else:
            assert src.schedule.cron is not None
            minute, hour, day, month, weekday = src.schedule.cron.split()
            when = crontab(
                minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday
            )
        # A run that is still waiting when the next one is due is dropped, not stacked up.
        out[f"produce:{name}"] = {
            "task": "sluice.produce",
            "schedule": when,
            "args": [name],
            "options": {"queue": "produce", "expires": 60},
        }
    return out

"""The beat schedule: one `sluice.produce` entry per source that has a schedule in the config,
and one `sluice.prune` when `[retention]` prunes anything (daily by default).

`sluice beat` runs it with celery-redbeat: the schedule and a lock live in Redis, so however many
beats run, exactly one dispatches; the others wait on the lock (checking every
BEAT_MAX_LOOP_INTERVAL seconds) and take over when it is released (a clean stop) or expires
(BEAT_LOCK_TIMEOUT seconds after the active beat died). A beat that loses the lock exits: its
supervisor restarts it, as a standby.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from sluice.shared.errors import SluiceError
from sluice.shared.redis_client import is_redis_url, redbeat_options
from sluice.shared.settings import Settings

BEAT_LOCK_TIMEOUT = 30  # seconds: a standby beat takes over this long after the active one died
BEAT_MAX_LOOP_INTERVAL = 5  # seconds: the active beat extends its lock at least this often


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
    retention = settings.retention
    if retention.enabled:
        # Run by a worker of the produce queue (the task lives in ops/prune_task.py); one
        # still waiting an hour later is dropped, the next day's takes over.
        assert retention.schedule.cron is not None or retention.schedule.every is not None
        every = retention.schedule.every
        out["prune"] = {
            "task": "sluice.prune",
            "schedule": every if every is not None else _crontab(str(retention.schedule.cron)),
            "options": {"queue": "produce", "expires": 3600},
        }
    return out


def _crontab(cron: str) -> Any:
    minute, hour, day, month, weekday = cron.split()
    return crontab(
        minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday
    )


def use_redbeat(
    app: Any,
    schedule: dict[str, dict[str, Any]],
    redis_url: str,
    *,
    lock_timeout: int = BEAT_LOCK_TIMEOUT,
    max_loop_interval: int = BEAT_MAX_LOOP_INTERVAL,
    master_name: str | None = None,
) -> None:
    """Configure the app's beat to keep `schedule` and its lock in Redis at `redis_url` (a
    sentinel:// URL with the master's name: the lock follows the master through a failover)."""
    if not is_redis_url(redis_url):
        raise SluiceError(
            "sluice beat keeps its schedule and lock in Redis: set SLUICE_REDIS_URL when the"
            " broker is not Redis",
            broker=redis_url.split("://")[0],
        )
    if master_name is None and getattr(app, "_context", None) is not None:
        master_name = app.context.settings.broker_master
    url, options = redbeat_options(redis_url, master_name)
    app.conf.update(
        beat_schedule=schedule,
        beat_scheduler="redbeat.RedBeatScheduler",
        beat_max_loop_interval=max_loop_interval,
        redbeat_redis_url=url,
        redbeat_redis_options=options,
        redbeat_key_prefix="sluice:redbeat",
        redbeat_lock_timeout=lock_timeout,
    )

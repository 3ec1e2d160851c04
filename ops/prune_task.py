"""The `sluice.prune` task: `sluice prune` run by a worker when beat schedules it
(producers/schedule.py adds the entry when `[retention]` prunes anything)."""

from __future__ import annotations

import logging
from typing import Any

from sluice.ops.prune import run_prune, summary
from sluice.shared.celery_app import app

log = logging.getLogger("sluice.prune")


def _prune() -> dict[str, Any]:
    results = run_prune(app.context.settings)
    for r in results:
        log.info(
            "prune %s: %s, %d deleted, %d kept in %.1fs%s",
            r.target,
            r.status,
            r.deleted,
            r.kept,
            r.seconds,
            f" ({'; '.join(r.notes)})" if r.notes else "",
        )
    return summary(results)


# Registered without decorator syntax: Celery's decorator is untyped.
prune = app.task(name="sluice.prune")(_prune)

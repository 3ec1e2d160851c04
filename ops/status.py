"""Queue depths as operators need them: waiting (in the list) + unacked (held by workers).

Flower counts only the waiting part (reference/celery.md §4); a page a worker holds is still work
to do, so both are shown.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis

from shared.celery_app import QUEUES


def queue_depths(client: redis.Redis) -> dict[str, dict[str, int]]:
    unacked: Counter[str] = Counter()
    for raw in client.hvals("unacked"):
        try:
            _, _, routing_key = json.loads(raw)
            unacked[str(routing_key)] += 1
        except (ValueError, TypeError):
            unacked["?"] += 1
    out = {}
    for q in QUEUES:
        waiting = int(client.llen(q))
        out[q] = {"waiting": waiting, "unacked": unacked[q], "total": waiting + unacked[q]}
    return out


def total_depth(client: redis.Redis) -> int:
    return sum(d["total"] for d in queue_depths(client).values())


def format_depths(depths: dict[str, Any]) -> str:
    lines = [f"{'queue':<18}{'waiting':>10}{'unacked':>10}{'total':>10}"]
    for q, d in depths.items():
        lines.append(f"{q:<18}{d['waiting']:>10}{d['unacked']:>10}{d['total']:>10}")
    return "\n".join(lines)

"""A live worker renews its hold on the messages it took, so only a dead worker's move again.

Celery's Redis transport keeps every message a worker took and has not acknowledged in the
`unacked` hash, indexed (`unacked_index`) by the time it was taken; each worker periodically puts
back on its queue the messages taken more than the visibility timeout ago, presumed held by a
worker that died. Alone, that makes the timeout a bound on the longest page (and on any retry
countdown, which a worker holds too) and makes a dead worker's pages wait that long. Here a
thread of each live worker stamps the messages it holds with the current time every sixth of the
timeout: the timeout then measures only how long a worker has been silent. A killed worker's
pages go back to their queue about one timeout after its last heartbeat; a live worker's are never
taken from it however long they take.

Only the Redis transport keeps such an index; with another broker the step does nothing (AMQP
brokers give a consumer's messages back when its connection closes).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import bootsteps

from sluice.shared.redis_client import is_redis_url, open_redis

log = logging.getLogger("sluice.heartbeat")

# Beats per visibility timeout: a worker may miss all but one before its pages move.
BEATS_PER_TIMEOUT = 6


def heartbeat_interval(visibility_timeout: float) -> float:
    return max(0.5, visibility_timeout / BEATS_PER_TIMEOUT)


def held_tags(consumer: Any) -> tuple[str, list[str]] | None:
    """The unacked index's key and the delivery tags of the messages this worker holds (taken,
    not yet acknowledged), or None when its broker keeps no such index."""
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    key = getattr(channel, "unacked_index_key", None)
    qos = getattr(channel, "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if key is None or delivered is None:
        return None
    dirty: set[Any] = getattr(qos, "_dirty", set())
    for _ in range(5):  # the event loop may change the dict while it is copied
        try:
            return str(key), [str(t) for t in list(delivered) if t not in dirty]
        except RuntimeError:
            continue
    return str(key), []


def renew(client: redis.Redis, key: str, tags: list[str], now: float | None = None) -> int:
    """Stamp `tags` in the unacked index with `now`; tags no longer there (acknowledged, or
    already put back) are not added again. Returns how many were stamped."""
    if not tags:
        return 0
    stamp = time.time() if now is None else now
    return int(client.zadd(key, dict.fromkeys(tags, stamp), xx=True, ch=True) or 0)


class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer step: one thread per worker process that consumes, started with the consumer
    and kept across its restarts (a broker reconnect restarts the consumer's steps)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._client: redis.Redis | None = None

    def start(self, parent: Any) -> None:
        self._consumer = parent
        if self._thread is not None and self._thread.is_alive():
            return
        settings = parent.app.context.settings
        self._interval = heartbeat_interval(settings.pipeline.visibility_timeout)
        url = parent.app.context.broker_url
        if not is_redis_url(url):
            return
        self._client = open_redis(
            url, settings.broker_master, socket_timeout=5, socket_connect_timeout=5
        )
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sluice-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._client is not None
        while not self._stop.wait(self._interval):
            found = held_tags(self._consumer)
            if found is None:
                continue
            try:
                renew(self._client, *found)
            except redis.RedisError as exc:  # the broker is failing over; the next beat retries
                log.warning("heartbeat: could not renew %d message(s): %s", len(found[1]), exc)

    def shutdown(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._client is not None:
            self._client.close()

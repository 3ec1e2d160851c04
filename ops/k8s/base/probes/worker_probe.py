"""Probe of a Sluice worker pod: does this pod's Celery node answer a ping?

    python /probes/worker_probe.py NODE [--live]

NODE is the worker's --hostname exactly as its args give it (`postgres@%h`); it is expanded the
way `celery worker` expands it, so `%h` becomes this pod's hostname, the pod name. Exit 0 when
that node answers within PING_SECONDS.

With --live (the liveness probe) the answer is also 0 when the broker cannot be reached: a
restart does not bring Redis back, and a worker stopped while Redis is away cannot hand its
unacknowledged pages back, which then wait for the visibility timeout. Readiness and startup
(without --live) fail in that case, so the pod shows as not ready.

Why not `celery -A sluice.shared.celery_app inspect ping`: the app is configured when a `sluice`
command calls app.configure(Settings.load()), not when it is imported, so the plain celery
command knows neither the broker URL (SLUICE_BROKER_URL) nor the msgpack the workers answer in
("Refusing to deserialize untrusted content of type msgpack"). Here `app.context` configures it
from the same environment and sluice.toml as the worker.
"""

from __future__ import annotations

import sys

from celery.utils.nodenames import default_nodename, host_format
from kombu.exceptions import OperationalError

from sluice.shared.celery_app import app

PING_SECONDS = 5.0


def main(argv: list[str]) -> int | str:
    if not argv or argv[1:] not in ([], ["--live"]):
        return "usage: worker_probe.py NODE [--live]"
    node = host_format(default_nodename(argv[0]))
    live = argv[1:] == ["--live"]
    app.context  # noqa: B018  (configures the app from the environment, as the worker did)
    try:
        replies = app.control.ping([node], timeout=PING_SECONDS)
    except OperationalError as exc:
        if live:
            print(f"broker unreachable ({exc}); not restarting {node} for that")
            return 0
        return f"broker unreachable: {exc}"
    if not replies:
        return f"{node} did not answer a ping within {PING_SECONDS:g} s"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

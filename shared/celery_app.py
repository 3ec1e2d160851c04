"""The Celery app: the one piece of module-level state, configured from Settings.

Reliability settings: late acks so a page is acknowledged only after its commit; requeue when a
pool process dies; a short visibility timeout that each live worker keeps renewing for the messages
it holds (shared/heartbeat.py), so Redis redelivers only what a dead worker held, soon after it
died (Celery's Redis transport redelivers any message unacknowledged for that long,
https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html). A
sentinel:// broker URL is followed to its current master (shared/redis_client.py). msgpack keeps
page messages compact.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, signals
from kombu import Queue
from kombu.exceptions import EncodeError

from sluice.shared.context import Context, SourceOpener
from sluice.shared.heartbeat import Heartbeat
from sluice.shared.page import Page
from sluice.shared.redis_client import is_sentinel
from sluice.shared.settings import SINK_NAMES, Settings


def ingest_queue(sink: str) -> str:
    return f"ingest.{sink}"


def send_page(page: Page) -> None:
    """Put a page on its sink's queue, packed (shared/page.py). Raises kombu's EncodeError, as
    Celery's own serialisation would, for a value the queue cannot carry. Its repr (task
    events, Flower, logs) names the page: a repr of its records showed their values to whoever
    reads Flower."""
    try:
        body = page.pack()
    except (ValueError, TypeError, OverflowError) as exc:
        raise EncodeError(exc) from exc
    app.send_task(
        "sluice.ingest",
        args=[body],
        queue=ingest_queue(page.sink),
        argsrepr=f"(<page {page.id}: {len(page.rows)} {page.stream} records for {page.sink}>,)",
    )


# One queue per sink, from the sink list, so status, metrics and `sluice worker` see every one
# (an unused sink's queue stays empty).
INGEST_QUEUES = tuple(ingest_queue(s) for s in SINK_NAMES)
QUEUES = (*INGEST_QUEUES, "dead_letter", "progress", "produce")


class SluiceTask(Task):  # type: ignore[misc]
    # msgpack keeps bytes bytes and numbers exact; set on the class, so it holds whenever the
    # task is bound (Celery would otherwise take the config of that moment, JSON by default).
    serializer = "msgpack"


class SluiceCelery(Celery):  # type: ignore[misc]
    _context: Context | None = None
    _open_source: SourceOpener | None = None

    def use_sources(self, open_source: SourceOpener) -> None:
        """Let this process's contexts open sources (to acknowledge pages). Called by the
        command that starts the process: the sources live above this layer."""
        self._open_source = open_source
        if self._context is not None:
            self._context.open_source = open_source

    def send_task(self, name: str, *args: Any, **kwargs: Any) -> Any:
        # Every message of ours is msgpack, whatever the process's config was when it started.
        kwargs.setdefault("serializer", "msgpack")
        return super().send_task(name, *args, **kwargs)

    def configure(self, settings: Settings) -> Context:
        """Point the app at the settings' broker (starting the embedded one if unset)."""
        if self._context is not None:
            # Re-pointed (tests, the demo): forget the pools bound to the previous broker URL.
            # Not closed: kombu's global producer cache may still hand them out for that URL.
            self._context.close()
            self._pool = None
            self.amqp._producer_pool = None
        ctx = Context(settings, self._open_source)
        vt = settings.pipeline.visibility_timeout
        transport: dict[str, Any] = {
            "visibility_timeout": vt,
            # Restore a dead worker's messages soon after the timeout (kombu 5.7 defaults
            # sweep only about every 100 s).
            "unacked_restore_interval": min(10, max(1, vt // 10)),
            "unacked_restore_throttle": 1,
        }
        if is_sentinel(ctx.broker_url):
            transport["master_name"] = settings.broker_master
        self.conf.update(
            broker_url=ctx.broker_url,
            broker_connection_retry_on_startup=True,
            broker_transport_options=transport,
            task_serializer="msgpack",
            result_serializer="msgpack",
            accept_content=["msgpack", "json"],
            task_ignore_result=True,
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=2,
            worker_send_task_events=True,
            task_queues=[Queue(q) for q in QUEUES],
            task_default_queue="produce",
            task_routes={
                "sluice.dead_letter": {"queue": "dead_letter"},
                "sluice.ack_page": {"queue": "progress"},
                "sluice.produce": {"queue": "produce"},
            },
            worker_hijack_root_logger=False,
            worker_redirect_stdouts=False,
        )
        self._context = ctx
        return ctx

    @property
    def context(self) -> Context:
        if self._context is None:
            self.configure(Settings.load())
        assert self._context is not None
        return self._context


app = SluiceCelery(
    "sluice",
    include=[
        "sluice.consumers.ingest",
        "sluice.consumers.dead_letter",
        "sluice.consumers.ack",
        "sluice.producers.produce",
    ],
    task_cls=SluiceTask,
)
app.steps["consumer"].add(Heartbeat)


@signals.worker_process_init.connect
def _fresh_context_after_fork(**_: Any) -> None:
    # A forked pool process must not reuse its parent's sockets.
    if app._context is not None:
        app._context = Context(app._context.settings, app._context.open_source)


@signals.worker_process_shutdown.connect
def _close_context(**_: Any) -> None:
    if app._context is not None:
        app._context.close()

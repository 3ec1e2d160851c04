"""The per-process context: settings plus the connections built from them, opened lazily.

A Celery pool process gets a fresh Context after fork (shared/celery_app.py), so no socket is ever
shared between processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cached_property
from typing import Any

import redis

from sluice.shared.database import broker_url, postgres_engine, postgres_url
from sluice.shared.errors import SluiceError
from sluice.shared.progress import Progress
from sluice.shared.records import Validator
from sluice.shared.redis_client import is_redis_url, open_redis
from sluice.shared.settings import Settings
from sluice.shared.sinks import Sink
from sluice.shared.state import StateStore, open_state, state_kind
from sluice.shared.streams import Stream

# Opens a configured source by name (sluice.producers.registry.open_source). The sources live
# above this layer: the command that starts a process hands it down (SluiceCelery.use_sources).
SourceOpener = Callable[[Settings, str], Any]


class Context:
    def __init__(self, settings: Settings, open_source: SourceOpener | None = None) -> None:
        self.settings = settings
        self.open_source = open_source
        self._sinks: dict[tuple[str, int | None], Sink] = {}
        # Sources opened by this process to acknowledge pages (shared/acknowledge.py) are kept:
        # opening a D1 file per page, and checkpointing it on every close, cost more than the
        # acknowledgement itself.
        self._sources: dict[str, Any] = {}
        self._validators: dict[str, Validator] = {}
        self._lock = threading.Lock()

    @cached_property
    def broker_url(self) -> str:
        return broker_url(self.settings)

    @cached_property
    def postgres_url(self) -> str:
        return postgres_url(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        url = self.redis_url
        if not is_redis_url(url):
            raise SluiceError(
                "page tracking needs Redis: set SLUICE_REDIS_URL when the broker is not Redis",
                broker=url.split("://")[0],
            )
        return open_redis(
            url,
            self.settings.broker_master,
            socket_timeout=30,
            socket_connect_timeout=10,
            health_check_interval=30,
        )

    @property
    def redis_url(self) -> str:
        """Where pages in flight, locks and rate limits are kept: SLUICE_REDIS_URL, else the
        broker."""
        return self.settings.env.get("SLUICE_REDIS_URL") or self.broker_url

    @cached_property
    def progress(self) -> Progress:
        return Progress(self.redis, lease_seconds=self.settings.pipeline.inflight_lease)

    @cached_property
    def state(self) -> StateStore:
        """The state store (runs, cursors, dead letters): PostgreSQL or the SQLite file."""
        if state_kind(self.settings) == "postgres":
            return StateStore(postgres_engine(self.postgres_url))
        return open_state(self.settings)

    def sink(self, name: str) -> Sink:
        """The process's sink of that name. In a threads-pool worker the SQLite sink is shared by
        the threads, which commit their pages together (group commit); the others hold one
        connection and one transaction at a time, so each thread gets its own, as each pool
        process does."""
        key = (name, None if name == "sqlite" else threading.get_ident())
        with self._lock:
            sink = self._sinks.get(key)
            if sink is None:
                sink = self._sinks[key] = self._open_sink(name)
            return sink

    def _open_sink(self, name: str) -> Sink:
        if name == "postgres":
            from sluice.shared.sinks.postgres import PostgresSink

            return PostgresSink(self.postgres_url)
        if name == "sqlite":
            from sluice.shared.sinks.sqlite import SqliteSink

            pipeline = self.settings.pipeline
            return SqliteSink(
                self.settings.sqlite_path,
                pipeline.sqlite_busy_timeout_ms,
                pipeline.sqlite_cache_mib,
            )
        if name == "d1":
            from sluice.shared.sinks.d1 import D1Sink

            cfg = self.settings.d1_sink
            if cfg is None:
                raise SluiceError("sink 'd1' is not configured: add [sinks.d1]", sink=name)
            variable = cfg.api_token_env
            return D1Sink(cfg, lambda: self.settings.secret(variable))
        raise SluiceError(f"unknown sink {name!r}; known: postgres, sqlite, d1", sink=name)

    def source(self, name: str) -> Any:
        """The process's source of that name, opened on first use. Under the lock so that the
        threads of a threads-pool worker open one between them, not one each."""
        with self._lock:
            source = self._sources.get(name)
            if source is None:
                if self.open_source is None:
                    raise SluiceError(
                        "this process cannot open sources: start workers with `sluice worker`",
                        source=name,
                    )
                source = self._sources[name] = self.open_source(self.settings, name)
            return source

    def drop_source(self, name: str, source: Any) -> None:
        """Close a source that failed, so the next use opens it again; a newer one that another
        thread opened meanwhile is kept."""
        with self._lock:
            if self._sources.get(name) is source:
                del self._sources[name]
        source.close()

    def validator(self, stream: Stream) -> Validator:
        v = self._validators.get(stream.name)
        if v is None or v.stream is not stream:
            v = self._validators[stream.name] = Validator(stream)
        return v

    def close(self) -> None:
        for resource in [*self._sinks.values(), *self._sources.values()]:
            resource.close()
        self._sinks.clear()
        self._sources.clear()
        if "redis" in self.__dict__:
            self.redis.close()
        if "state" in self.__dict__:
            self.state.dispose()

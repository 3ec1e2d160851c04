"""The per-process context: settings plus the connections built from them, opened lazily.

A Celery pool process gets a fresh Context after fork (shared/celery_app.py), so no socket is ever
shared between processes.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import redis
from sqlalchemy.engine import Engine

from shared.database import broker_url, postgres_engine, postgres_url
from shared.errors import SluiceError
from shared.progress import Progress
from shared.records import Validator
from shared.settings import Settings
from shared.sink import Sink
from shared.streams import Stream


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sinks: dict[str, Sink] = {}
        # Sources opened by this process (producers/ack.py keeps them: opening a D1 file per
        # page, and checkpointing it on every close, cost more than the acknowledgement).
        self.sources: dict[str, Any] = {}
        self._validators: dict[str, Validator] = {}

    @cached_property
    def broker_url(self) -> str:
        return broker_url(self.settings)

    @cached_property
    def postgres_url(self) -> str:
        return postgres_url(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        url = self.settings.env.get("SLUICE_REDIS_URL") or self.broker_url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise SluiceError(
                "page tracking needs Redis: set SLUICE_REDIS_URL when the broker is not Redis",
                broker=url.split("://")[0],
            )
        return redis.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30
        )

    @cached_property
    def progress(self) -> Progress:
        return Progress(self.redis, lease_seconds=self.settings.pipeline.inflight_lease)

    @cached_property
    def state(self) -> Engine:
        """The state database (source runs, dead letters): PostgreSQL."""
        return postgres_engine(self.postgres_url)

    def sink(self, name: str) -> Sink:
        sink = self._sinks.get(name)
        if sink is None:
            if name == "postgres":
                from shared.postgres_sink import PostgresSink

                sink = PostgresSink(self.postgres_url)
            elif name == "sqlite":
                from shared.sqlite_sink import SqliteSink

                sink = SqliteSink(
                    self.settings.sqlite_path, self.settings.pipeline.sqlite_busy_timeout_ms
                )
            elif name == "d1":
                from shared.d1_sink import D1Sink

                cfg = self.settings.d1_sink
                if cfg is None:
                    raise SluiceError("sink 'd1' is not configured: add [sinks.d1]", sink=name)
                variable = cfg.api_token_env
                sink = D1Sink(cfg, lambda: self.settings.secret(variable))
            else:
                raise SluiceError(f"unknown sink {name!r}; known: postgres, sqlite, d1", sink=name)
            self._sinks[name] = sink
        return sink

    def validator(self, stream: Stream) -> Validator:
        v = self._validators.get(stream.name)
        if v is None or v.stream is not stream:
            v = self._validators[stream.name] = Validator(stream)
        return v

    def close(self) -> None:
        for resource in [*self._sinks.values(), *self.sources.values()]:
            resource.close()
        self._sinks.clear()
        self.sources.clear()
        if "redis" in self.__dict__:
            self.redis.close()
        if "state" in self.__dict__:
            self.state.dispose()

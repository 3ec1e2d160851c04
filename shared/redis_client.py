"""Open a Redis client from a configured URL: a server's own (redis://, rediss://, unix://) or
Redis Sentinel's, in kombu's form (sentinel://host:port;sentinel://host:port/db).

Every Redis client Sluice opens (the broker's queues read by status and metrics, page tracking,
the source locks, the rate limits, beat's lock) goes through `open_redis`, so a Sentinel
deployment is followed to its current master everywhere: a client of a sentinel URL asks the
sentinels for the master of `master_name` and asks again when its connection fails, which is
how it moves to the new master after a failover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from sluice.shared.errors import ConfigError

SENTINEL = "sentinel"
REDIS_SCHEMES = ("redis", "rediss", "unix", SENTINEL)
NEEDS_MASTER = (
    "a sentinel:// URL needs the name the sentinels monitor the master under:"
    " set SLUICE_BROKER_MASTER or [broker] master_name"
)


def scheme(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def is_redis_url(url: str) -> bool:
    """Whether the URL names Redis, directly or through Sentinel."""
    return scheme(url) in REDIS_SCHEMES


def is_sentinel(url: str) -> bool:
    return scheme(url) == SENTINEL


@dataclass(frozen=True)
class SentinelTarget:
    """What a sentinel:// URL names: the sentinels, and the database and credentials of the
    master they point at (taken from the first URL, as kombu does)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_sentinel(url: str) -> SentinelTarget:
    """`sentinel://[[user]:password@]host:port[/db];sentinel://host:port;…`"""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for i, part in enumerate(p.strip() for p in url.split(";") if p.strip()):
        if not is_sentinel(part):
            raise ConfigError([f"not a sentinel URL: {part.split('@')[-1]!r}"])
        u = urlsplit(part)
        try:
            port = u.port or 26379
        except ValueError as exc:
            raise ConfigError([f"bad port in sentinel URL {u.hostname!r}: {exc}"]) from None
        if not u.hostname:
            raise ConfigError(["a sentinel URL needs a host: sentinel://host:port"])
        sentinels.append((u.hostname, port))
        if i == 0:
            path = u.path.strip("/")
            if path and not path.isdigit():
                raise ConfigError([f"the database in a sentinel URL is a number, not {path!r}"])
            db = int(path or 0)
            username = unquote(u.username) if u.username else None
            password = unquote(u.password) if u.password else None
    if not sentinels:
        raise ConfigError(["a sentinel URL names no sentinel"])
    return SentinelTarget(tuple(sentinels), db, username, password)


def open_redis(url: str, master_name: str | None = None, **options: Any) -> redis.Redis:
    """A client for `url`; `options` are redis-py connection options (timeouts, …). A sentinel
    URL needs `master_name`: the name the sentinels monitor the master under."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    if not master_name:
        raise ConfigError([NEEDS_MASTER])
    target = parse_sentinel(url)
    sentinel_options = {
        k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs=sentinel_options
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return client


def redbeat_options(url: str, master_name: str | None) -> tuple[str, dict[str, Any]]:
    """celery-redbeat's URL and options for `url`: it reaches Sentinel through its own
    `redis-sentinel://` form with the sentinels listed in the options."""
    base = {"socket_connect_timeout": 10, "health_check_interval": 30}
    if not is_sentinel(url):
        return url, base
    if not master_name:
        raise ConfigError([NEEDS_MASTER])
    target = parse_sentinel(url)
    options: dict[str, Any] = {
        "sentinels": [list(s) for s in target.sentinels],
        "service_name": master_name,
        "db": target.db,
        "socket_timeout": 10,
    }
    if target.password:
        options["password"] = target.password
    return "redis-sentinel://", options

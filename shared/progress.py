"""Pages in flight, kept in Redis: a source's progress advances only after every sink committed.

For each page the producer registers the sinks still to commit it and the source's acknowledgement
data (for D1: the row ids to mark processed). Each sink, after its commit, removes itself; the one
that empties the set triggers the acknowledgement. The producer also records, per source, the last
key of each page in flight, so the next run continues after them instead of enqueuing the same
rows again; pages older than the lease are presumed lost and their rows are read again.
If Redis itself loses this state, the rows simply stay unacknowledged and are read again: a
duplicate delivery, which the sinks absorb, never a loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgpack
import redis

_PREFIX = "sluice"

# Remove a member (a sink, or the page's dead letters) from the page's pending set, first adding
# ARGV[2] when given (the dead letters a sink's commit left to store); 1 when nothing is left.
_COMMITTED = """
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SADD', KEYS[1], ARGV[2])
end
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then return 1 end
return 0
"""

# Reserve ARGV[1] consecutive source orders; returns the first. The counter never falls behind
# the server's clock in microseconds, so orders keep growing even if Redis lost the counter.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < now then redis.call('SET', KEYS[1], string.format('%d', now)) end
return redis.call('INCRBY', KEYS[1], ARGV[1]) - tonumber(ARGV[1])
"""


def letters_member(sink: str) -> str:
    """The pending-set member of a page's dead letters from `sink` (or "source")."""
    return f"letters:{sink}"


class Progress:
    def __init__(self, client: redis.Redis, lease_seconds: float, key_ttl: int = 7 * 86400):
        self.r = client
        self.lease_seconds = lease_seconds
        self.key_ttl = max(key_ttl, int(lease_seconds * 2))
        self._committed = client.register_script(_COMMITTED)
        self._reserve = client.register_script(_RESERVE)

    @staticmethod
    def _pending(page_id: str) -> str:
        return f"{_PREFIX}:page:{page_id}:pending"

    @staticmethod
    def _ack(page_id: str) -> str:
        return f"{_PREFIX}:page:{page_id}:ack"

    @staticmethod
    def _inflight(source: str) -> str:
        return f"{_PREFIX}:inflight:{source}"

    @staticmethod
    def _resume(source: str) -> str:
        return f"{_PREFIX}:resume:{source}"

    @staticmethod
    def _publishing(source: str) -> str:
        return f"{_PREFIX}:publishing:{source}"

    def register(
        self,
        source: str,
        page_id: str,
        members: Sequence[str],
        ack: Any,
        last_key: Any,
        rows: int = 0,
    ) -> int | None:
        """Called before the page is published, so a fast consumer always finds it. `members`:
        the sinks, and `letters_member("source")` when the page carries dead letters.

        Returns the first of `rows` source orders reserved for the page's rows (row i gets
        first + i): increasing across every producer, so "the first read of a key" and "the
        last" mean the same in every sink (None when the page has no rows)."""
        p = self.r.pipeline(transaction=True)
        p.sadd(self._pending(page_id), *members)
        p.expire(self._pending(page_id), self.key_ttl)
        p.set(self._ack(page_id), msgpack.packb([source, ack]), ex=self.key_ttl)
        p.zadd(self._inflight(source), {page_id: time.time()})
        p.hset(self._resume(source), page_id, msgpack.packb(last_key))
        p.set(self._publishing(source), page_id, ex=self.key_ttl)
        if rows:
            self._reserve(keys=[f"{_PREFIX}:order"], args=[rows], client=p)
        results = p.execute()
        return int(results[-1]) if rows else None

    def published(self, source: str) -> None:
        """The page registered last for `source` is on its queues."""
        self.r.delete(self._publishing(source))

    def forget_unpublished(self, source: str) -> str | None:
        """Called by a run that just took the source's lock: a page registered by a run that
        died before it published the page has no message anywhere, and would hold its rows
        back until the lease ran out. It is taken out of flight, so this run reads its rows
        again (should it have been published after all, its rows are read twice: a duplicate
        the sinks skip). Returns its id, or None."""
        page_id = self.r.get(self._publishing(source))
        if page_id is None:
            return None
        found = page_id.decode() if isinstance(page_id, bytes) else str(page_id)
        self.done(source, found)
        self.r.delete(self._publishing(source))
        return found

    def committed(self, page_id: str, member: str, hold: str | None = None) -> bool:
        """Record that `member` (a sink, or a page's dead letters) is done with the page; True
        when nothing is left. `hold` is added first: the dead letters a sink's commit left to
        store, so the page is acknowledged only once they are."""
        return bool(self._committed(keys=[self._pending(page_id)], args=[member, hold or ""]))

    def ack_data(self, page_id: str) -> tuple[str, Any] | None:
        raw = self.r.get(self._ack(page_id))
        if raw is None:
            return None
        source, ack = msgpack.unpackb(raw)
        return str(source), ack

    def done(self, source: str, page_id: str) -> None:
        p = self.r.pipeline(transaction=True)
        p.delete(self._pending(page_id), self._ack(page_id))
        p.zrem(self._inflight(source), page_id)
        p.hdel(self._resume(source), page_id)
        p.execute()

    def resume_after(self, source: str) -> Any | None:
        """Where the next run of `source` should continue: after the last key in flight, or from
        the start (None) when nothing is in flight or a page outlived its lease."""
        keys = self.resume_keys(source)
        if not keys:
            return None
        try:
            return max(keys)
        except TypeError:  # keys of two kinds (a D1 source's order changed): start over
            return None

    def resume_keys(self, source: str) -> list[Any] | None:
        """The last key of every page of `source` in flight ([] when none), or None when a
        page outlived its lease: then everything unacknowledged is read again. HTTP sources
        use this: their keys are (partition, window end), one resume point per partition."""
        expired = self.r.zrangebyscore(
            self._inflight(source), "-inf", time.time() - self.lease_seconds, start=0, num=1
        )
        if expired:
            self.r.delete(self._inflight(source), self._resume(source))
            return None
        return [msgpack.unpackb(v) for v in self.r.hvals(self._resume(source))]

    def forget_resume(self, source: str) -> None:
        """Drop the source's resume points, so its next run starts from its cursors (an
        operator reset them). Pages in flight still commit and acknowledge as usual."""
        self.r.delete(self._inflight(source), self._resume(source))

    def in_flight(self, source: str) -> int:
        return int(self.r.zcard(self._inflight(source)))

    def in_flight_age(self, source: str) -> tuple[int, float | None]:
        """Pages of `source` published and not yet committed by every sink, and the age in
        seconds of the oldest (None when there is none). A page older than the lease is presumed
        lost: its rows are read again."""
        p = self.r.pipeline(transaction=True)
        p.zcard(self._inflight(source))
        p.zrange(self._inflight(source), 0, 0, withscores=True)
        count, oldest = p.execute()
        age = time.time() - float(oldest[0][1]) if oldest else None
        return int(count), age

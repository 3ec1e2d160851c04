"""A rate limit shared by every producer process on every machine, kept in Redis.

Each API has one or more budgets ("at most N units in any rolling P seconds": requests, or Binance
request weight). A call first takes its cost from every budget in one Lua script, so two processes
can never both take the last unit; when a budget is spent the script answers how long until enough
units expire, and the caller sleeps that long. Times come from the Redis server's clock, so machines
with skewed clocks still share one window.

Two more shared states per API:
- a pause (after a 429, or when Binance's `x-mbx-used-weight-1m` says the IP is near its limit,
  e.g. because of traffic we do not see): nobody calls until it ends;
- a ban (Binance 418): calls fail at once, naming the end of the ban, instead of waiting.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

_PREFIX = "sluice:ratelimit"

# KEYS: pause key, then one sorted set per budget. ARGV: cost, member id, then limit and window
# (ms) per budget. Returns 0 when the cost was taken, else the milliseconds to wait.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = redis.call('PTTL', KEYS[1])
if pause > 0 then return pause end
local cost = tonumber(ARGV[1])
local wait = 0
for i = 2, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local window = tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local used = redis.call('ZCARD', KEYS[i])
  if used + cost > limit then
    -- The entry whose expiry frees enough room for this cost.
    local idx = used + cost - limit - 1
    local entry = redis.call('ZRANGE', KEYS[i], idx, idx, 'WITHSCORES')
    local w = 1
    if entry[2] then w = math.max(1, tonumber(entry[2]) + window - now + 1) end
    if w > wait then wait = w end
  end
end
if wait > 0 then return wait end
for i = 2, #KEYS do
  local window = tonumber(ARGV[2 * i])
  for n = 1, cost do redis.call('ZADD', KEYS[i], now, ARGV[2] .. ':' .. n) end
  redis.call('PEXPIRE', KEYS[i], window)
end
return 0
"""

# Extend the pause to at least ARGV[1] ms (never shorten one another process set).
_PAUSE = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
"""


@dataclass(frozen=True)
class Budget:
    limit: int
    per_seconds: float


class RateLimitError(Exception):
    """A cost larger than a whole budget can never be taken."""


class SharedRateLimiter:
    def __init__(
        self,
        client: redis.Redis,
        api: str,
        budgets: Sequence[Budget],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.r = client
        self.api = api
        self.budgets = tuple(budgets)
        self._sleep = sleep
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)
        self.waited = 0.0  # seconds this limiter slept, for tests and logs

    def _budget_key(self, b: Budget) -> str:
        return f"{_PREFIX}:{self.api}:{b.limit}:{b.per_seconds:g}"

    @property
    def _pause_key(self) -> str:
        return f"{_PREFIX}:{self.api}:pause"

    @property
    def _ban_key(self) -> str:
        return f"{_PREFIX}:{self.api}:ban"

    def try_acquire(self, cost: int = 1) -> float:
        """Take `cost` units from every budget: 0.0 when taken, else seconds to wait first."""
        for b in self.budgets:
            if cost > b.limit:
                raise RateLimitError(f"cost {cost} exceeds the budget {b.limit}/{b.per_seconds}s")
        keys = [self._pause_key, *(self._budget_key(b) for b in self.budgets)]
        args: list[str | int | float] = [cost, uuid.uuid4().hex]
        for b in self.budgets:
            args += [b.limit, int(b.per_seconds * 1000)]
        waited_ms = int(self._acquire(keys=keys, args=args))
        return waited_ms / 1000.0

    def acquire(self, cost: int = 1, max_wait: float | None = None) -> float:
        """Block until `cost` units are taken; returns the seconds slept. Raises TimeoutError if
        the next wait alone would exceed `max_wait`."""
        slept = 0.0
        while True:
            wait = self.try_acquire(cost)
            if wait <= 0:
                return slept
            if max_wait is not None and wait > max_wait:
                raise TimeoutError(f"rate limit of {self.api} needs a {wait:.1f}s wait")
            self._sleep(wait)
            slept += wait
            self.waited += wait

    def pause(self, seconds: float) -> None:
        """Nobody calls this API for `seconds` (a 429, or its weight header near the limit)."""
        if seconds > 0:
            self._pause(keys=[self._pause_key], args=[max(1, int(seconds * 1000))])

    def ban(self, seconds: float, reason: str) -> None:
        self.r.set(self._ban_key, reason[:500], px=max(1, int(seconds * 1000)))

    def banned(self) -> tuple[float, str] | None:
        """(seconds left, reason) while a ban is in force."""
        p = self.r.pipeline()
        p.pttl(self._ban_key)
        p.get(self._ban_key)
        ttl, reason = p.execute()
        if reason is None or ttl is None or ttl <= 0:
            return None
        text = reason.decode() if isinstance(reason, bytes) else str(reason)
        return ttl / 1000.0, text

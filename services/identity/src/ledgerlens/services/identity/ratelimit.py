"""Rate limits for IssueToken: in-process by default, Redis when ``redis_url`` is set.

Both backends are sliding windows of one minute over a log of hits: the (N+1)th hit in
any 60 s is refused, and ``retry_after`` is when the oldest hit in the window leaves
it. A refused hit is not recorded, so a client hammering while limited is let in again
as soon as its old hits age out.

:class:`BadSecretThrottle` slows down repeated wrong secrets per (key id, address).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from ledgerlens.runtime.errors import ResourceExhausted
from ledgerlens.services.identity import metrics

__all__ = [
    "WINDOW_SECONDS",
    "BadSecretThrottle",
    "InProcessRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "enforce",
]

WINDOW_SECONDS = 60.0


class RateLimiter(Protocol):
    async def hit(self, bucket_key: str, limit_per_minute: int) -> tuple[bool, float]:
        """Record a hit if allowed. Returns (allowed, seconds until one is allowed)."""
        ...


async def enforce(limiter: RateLimiter, bucket_key: str, limit_per_minute: int, what: str) -> None:
    """Hit ``bucket_key``; :class:`ResourceExhausted` (with ``retry_after``) when over."""
    allowed, retry_after = await limiter.hit(bucket_key, limit_per_minute)
    if not allowed:
        metrics.record_rate_limited(what)
        raise ResourceExhausted(
            f"too many token requests for this {what}: limit {limit_per_minute} per minute",
            retry_after=max(retry_after, 0.001),
            reason="RATE_LIMITED",
            metadata={"limit_per_minute": str(limit_per_minute), "scope": what},
        )


class InProcessRateLimiter:
    """Sliding-window log per bucket, in this process only (one replica, dev, tests).

    No ``await`` between reading and recording, so it is atomic under asyncio.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_seconds: float = WINDOW_SECONDS,
        max_buckets: int = 100_000,
    ) -> None:
        self._clock = clock
        self._window = window_seconds
        self._max_buckets = max_buckets
        self._hits: dict[str, deque[float]] = {}

    async def hit(self, bucket_key: str, limit_per_minute: int) -> tuple[bool, float]:
        now = self._clock()
        start = now - self._window
        hits = self._hits.get(bucket_key)
        if hits is None:
            if len(self._hits) >= self._max_buckets:
                self._sweep(start)
            hits = self._hits[bucket_key] = deque()
        while hits and hits[0] <= start:
            hits.popleft()
        if len(hits) >= limit_per_minute:
            # The hit that makes room is the one ``limit`` places from the end.
            return False, hits[-limit_per_minute] + self._window - now
        hits.append(now)
        return True, 0.0

    def _sweep(self, start: float) -> None:
        """Forget buckets whose hits all left the window (bounds memory)."""
        for key in [k for k, v in self._hits.items() if not v or v[-1] <= start]:
            del self._hits[key]


# KEYS[1] bucket; ARGV: limit, window (ms), unique member. Redis' own clock is used so
# processes on hosts with skewed clocks share one timeline.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
local retry = tonumber(oldest[2]) + window - now
if retry < 1 then retry = 1 end
return {0, retry}
"""


class RedisRateLimiter:
    """Sliding-window log in a sorted set, read and updated in one Lua script (atomic
    across every process that shares the Redis)."""

    def __init__(
        self, client: Redis, *, prefix: str = "ledgerlens:identity:rl:", window_seconds: float = 60
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._window_ms = int(window_seconds * 1000)
        self._script = client.register_script(_SLIDING_WINDOW)

    async def hit(self, bucket_key: str, limit_per_minute: int) -> tuple[bool, float]:
        allowed, retry_ms = await self._script(
            keys=[self._prefix + bucket_key],
            args=[limit_per_minute, self._window_ms, uuid.uuid4().hex],
        )
        return bool(int(allowed)), int(retry_ms) / 1000.0


@dataclass
class _Failures:
    count: int
    last: float


class BadSecretThrottle:
    """Delays answers after wrong secrets, per (key id, client address), in-process.

    The delay doubles with each failure (``base``, 2x``base``, ...) up to ``max_delay``;
    a success or ``forget_after`` seconds without failures resets the count.
    """

    def __init__(
        self,
        max_delay: float,
        *,
        base_delay: float = 0.1,
        forget_after: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_entries: int = 100_000,
    ) -> None:
        self.max_delay = max_delay
        self._base = base_delay
        self._forget_after = forget_after
        self._clock = clock
        self._sleep = sleep
        self._max_entries = max_entries
        self._failures: dict[tuple[str, str], _Failures] = {}

    def failures(self, key_id: str, address: str) -> int:
        entry = self._failures.get((key_id, address))
        if entry is None or self._clock() - entry.last > self._forget_after:
            return 0
        return entry.count

    def record_failure(self, key_id: str, address: str) -> tuple[int, float]:
        """Count a failure; returns (failures so far, delay to apply)."""
        now = self._clock()
        if len(self._failures) >= self._max_entries:
            for k in [k for k, v in self._failures.items() if now - v.last > self._forget_after]:
                del self._failures[k]
        count = self.failures(key_id, address) + 1
        self._failures[(key_id, address)] = _Failures(count=count, last=now)
        delay = min(self.max_delay, self._base * (2 ** (count - 1))) if self.max_delay > 0 else 0.0
        return count, delay

    async def delay(self, seconds: float) -> None:
        if seconds > 0:
            await self._sleep(seconds)

    def record_success(self, key_id: str, address: str) -> None:
        self._failures.pop((key_id, address), None)

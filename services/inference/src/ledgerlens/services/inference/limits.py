"""Rate limits and quotas per API key and per tenant: requests/min, tokens/min and a
daily token budget (UTC day).

    reservation = await limiter.check(key_id, tenant, estimated_tokens)   # before
    ...provider call...
    await limiter.record(reservation, actual_tokens)                      # after
    # or, when the call failed: await limiter.release(reservation)

**Fixed windows.** Each limit is a counter per window: the minute (``epoch // 60``) and
the UTC day (``epoch // 86400``). ``check`` compares every counter with its limit and,
only if all six fit, adds 1 request and ``estimated_tokens`` to each; a refused call
adds nothing. ``record`` adds ``actual - estimated`` to the token counters of the
windows the reservation was made in, so tokens/min and the daily budget count actual
tokens. Fixed windows were chosen over sliding logs because token counters must be
*adjusted* after the fact (a log of hits cannot be reconciled cheaply) and because the
daily budget is by definition a calendar window; the price is that up to twice a
per-minute limit may pass around a minute boundary. ``retry_after`` is the time until
the refusing window ends (exact for fixed windows).

**Atomic across replicas.** The Redis backend runs check-and-increment as one Lua
script (``register_script``: EVALSHA), with Redis' own clock choosing the window, so
replicas with skewed clocks share one timeline. All counters of a tenant carry the hash
tag ``{tenant}``, so they live in one slot (Redis Cluster-safe). The in-process
backend does the same without an ``await`` between read and write (atomic under
asyncio; one replica only).

A limit of 0 means unlimited.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from ledgerlens.runtime.errors import ResourceExhausted
from ledgerlens.services.inference.metrics import record_refused_limit

__all__ = [
    "InProcessLimitBackend",
    "LimitBackend",
    "LimitSettings",
    "RateLimiter",
    "RedisLimitBackend",
    "Reservation",
    "build_limiter",
]

_log = logging.getLogger(__name__)

MINUTE = 60
DAY = 86_400
# counters outlive their window a little, so late reconciliations still find them
_TTL_SLACK = 120

#: (name used in messages, window seconds) of the six counters, in check order
_COUNTERS: tuple[tuple[str, str, int], ...] = (
    ("key", "requests per minute", MINUTE),
    ("key", "tokens per minute", MINUTE),
    ("key", "tokens per day", DAY),
    ("tenant", "requests per minute", MINUTE),
    ("tenant", "tokens per minute", MINUTE),
    ("tenant", "tokens per day", DAY),
)
_TOKEN_COUNTERS = (1, 2, 4, 5)


class LimitSettings(BaseModel):
    """Per-key and per-tenant limits (0: unlimited). Redis when ``redis_url`` is set."""

    redis_url: str | None = None
    key_prefix: str = "ledgerlens:inference:limits:"
    key_requests_per_minute: int = Field(default=600, ge=0)
    key_tokens_per_minute: int = Field(default=200_000, ge=0)
    key_tokens_per_day: int = Field(default=5_000_000, ge=0)
    tenant_requests_per_minute: int = Field(default=3_000, ge=0)
    tenant_tokens_per_minute: int = Field(default=1_000_000, ge=0)
    tenant_tokens_per_day: int = Field(default=50_000_000, ge=0)

    def limits(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.key_requests_per_minute,
            self.key_tokens_per_minute,
            self.key_tokens_per_day,
            self.tenant_requests_per_minute,
            self.tenant_tokens_per_minute,
            self.tenant_tokens_per_day,
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """What ``check`` counted, so ``record``/``release`` adjust the same windows."""

    api_key_id: str
    tenant_id: str
    estimated_tokens: int
    #: the counters' keys (window included) as the backend named them
    counter_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    #: index into the six counters (see ``_COUNTERS``)
    counter: int
    retry_after: float
    current: int


class LimitBackend(Protocol):
    async def reserve(
        self, bases: Sequence[str], limits: Sequence[int], amounts: Sequence[int]
    ) -> tuple[tuple[str, ...], Refusal | None]:
        """Atomically: if every ``counter + amount <= limit`` (limit 0: no limit), add
        the amounts. Returns the six windowed keys and the first refusal, if any."""
        ...

    async def adjust(self, keys: Sequence[str], delta: int) -> None:
        """Add ``delta`` to each of ``keys`` (never below 0)."""
        ...

    async def aclose(self) -> None: ...


class InProcessLimitBackend:
    """Counters in a dict (one process). ``clock`` is wall time (epoch seconds)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, max_keys: int = 200_000):
        self._clock = clock
        self._max_keys = max_keys
        #: key -> (value, expires at)
        self._counters: dict[str, tuple[int, float]] = {}

    def _get(self, key: str, now: float) -> int:
        entry = self._counters.get(key)
        if entry is None or entry[1] <= now:
            return 0
        return entry[0]

    async def reserve(
        self, bases: Sequence[str], limits: Sequence[int], amounts: Sequence[int]
    ) -> tuple[tuple[str, ...], Refusal | None]:
        now = self._clock()
        keys: list[str] = []
        ends: list[float] = []
        for base, (_, _, window) in zip(bases, _COUNTERS, strict=True):
            index = int(now // window)
            keys.append(f"{base}:{index}")
            ends.append((index + 1) * window)
        for i, key in enumerate(keys):
            current = self._get(key, now)
            if limits[i] > 0 and current + amounts[i] > limits[i]:
                return tuple(keys), Refusal(i, ends[i] - now, current)
        if len(self._counters) >= self._max_keys:
            self._sweep(now)
        for i, key in enumerate(keys):
            if amounts[i]:
                value = self._get(key, now) + amounts[i]
                self._counters[key] = (value, ends[i] + _TTL_SLACK)
        return tuple(keys), None

    async def adjust(self, keys: Sequence[str], delta: int) -> None:
        now = self._clock()
        for key in keys:
            entry = self._counters.get(key)
            if entry is not None and entry[1] > now:
                self._counters[key] = (max(0, entry[0] + delta), entry[1])

    def _sweep(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._counters.items() if exp <= now]:
            del self._counters[key]

    async def aclose(self) -> None:
        return None


# KEYS: six counter base names. ARGV: six limits, six amounts, six window lengths (s),
# ttl slack (s). Returns {0, keys...} when admitted, or {i, retry_ms, current, keys...}
# with the 1-based index of the first counter that refused.
_RESERVE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keys, ends = {}, {}
for i = 1, 6 do
  local window_ms = tonumber(ARGV[12 + i]) * 1000
  local index = math.floor(now_ms / window_ms)
  keys[i] = KEYS[i] .. ':' .. index
  ends[i] = (index + 1) * window_ms
end
for i = 1, 6 do
  local limit = tonumber(ARGV[i])
  local amount = tonumber(ARGV[6 + i])
  if limit > 0 then
    local current = tonumber(redis.call('GET', keys[i]) or '0')
    if current + amount > limit then
      return {i, ends[i] - now_ms, current, unpack(keys)}
    end
  end
end
local slack_ms = tonumber(ARGV[19]) * 1000
for i = 1, 6 do
  local amount = tonumber(ARGV[6 + i])
  if amount > 0 then
    redis.call('INCRBY', keys[i], amount)
    redis.call('PEXPIREAT', keys[i], ends[i] + slack_ms)
  end
end
return {0, 0, 0, unpack(keys)}
"""

# KEYS: windowed counters. ARGV: delta. Adjusts only counters that still exist.
_ADJUST = """
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], delta)
    if v < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
"""


class RedisLimitBackend:
    """Counters in Redis, checked and incremented by one Lua script (atomic)."""

    def __init__(self, client: Redis, *, owns_client: bool = False) -> None:
        self._client = client
        self._owns = owns_client
        self._reserve = client.register_script(_RESERVE)
        self._adjust = client.register_script(_ADJUST)

    @classmethod
    def from_url(cls, url: str) -> RedisLimitBackend:
        return cls(Redis.from_url(url), owns_client=True)

    async def reserve(
        self, bases: Sequence[str], limits: Sequence[int], amounts: Sequence[int]
    ) -> tuple[tuple[str, ...], Refusal | None]:
        windows = [w for _, _, w in _COUNTERS]
        result = await self._reserve(
            keys=list(bases), args=[*limits, *amounts, *windows, _TTL_SLACK]
        )
        status, retry_ms, current = int(result[0]), int(result[1]), int(result[2])
        keys = tuple(k.decode() if isinstance(k, bytes) else str(k) for k in result[3:])
        if status == 0:
            return keys, None
        return keys, Refusal(status - 1, retry_ms / 1000.0, current)

    async def adjust(self, keys: Sequence[str], delta: int) -> None:
        if keys and delta:
            await self._adjust(keys=list(keys), args=[delta])

    async def aclose(self) -> None:
        if self._owns:
            await self._client.aclose()


class RateLimiter:
    """The six limits of a request, over one backend."""

    def __init__(self, settings: LimitSettings, backend: LimitBackend) -> None:
        self.settings = settings
        self._backend = backend

    async def aclose(self) -> None:
        await self._backend.aclose()

    @property
    def counts_tokens(self) -> bool:
        """Whether a token limit is set: when none is, a request's token estimate can
        refuse nothing, and ``record`` brings the counters to the actual tokens anyway,
        so callers may skip estimating (pass 0)."""
        limits = self.settings.limits()
        return any(limits[i] for i in _TOKEN_COUNTERS)

    def _bases(self, api_key_id: str, tenant_id: str) -> list[str]:
        # one hash tag per tenant: every counter of the request lives in one slot
        root = f"{self.settings.key_prefix}{{{tenant_id}}}:"
        names = ("rpm", "tpm", "tpd")
        return [f"{root}key:{api_key_id}:{n}" for n in names] + [f"{root}tenant:{n}" for n in names]

    async def check(self, api_key_id: str, tenant_id: str, estimated_tokens: int) -> Reservation:
        """Count one request and ``estimated_tokens`` against every limit, or raise
        :class:`ResourceExhausted` (``retry_after``, the limit named in the message and
        in ``metadata``) and count nothing."""
        estimated = max(0, int(estimated_tokens))
        limits = self.settings.limits()
        for i in _TOKEN_COUNTERS:
            scope, what, _ = _COUNTERS[i]
            if limits[i] and estimated > limits[i]:
                record_refused_limit(scope, what)
                raise ResourceExhausted(
                    f"request needs about {estimated} tokens, more than the {scope} limit "
                    f"of {limits[i]} {what}",
                    reason="REQUEST_TOO_LARGE_FOR_LIMIT",
                    metadata={"scope": scope, "limit": what, "value": str(limits[i])},
                )
        amounts = (1, estimated, estimated, 1, estimated, estimated)
        keys, refusal = await self._backend.reserve(
            self._bases(api_key_id, tenant_id), limits, amounts
        )
        if refusal is not None:
            scope, what, _ = _COUNTERS[refusal.counter]
            limit = limits[refusal.counter]
            retry_after = max(0.001, refusal.retry_after)
            _log.info("inference limit hit: %s %s (limit %d)", scope, what, limit)
            record_refused_limit(scope, what)
            raise ResourceExhausted(
                f"{scope} limit reached: {limit} {what} (retry in {math.ceil(retry_after)} s)",
                retry_after=retry_after,
                reason="RATE_LIMITED" if "minute" in what else "QUOTA_EXHAUSTED",
                metadata={"scope": scope, "limit": what, "value": str(limit)},
            )
        return Reservation(api_key_id, tenant_id, estimated, keys)

    async def record(self, reservation: Reservation, actual_tokens: int) -> None:
        """Reconcile: the token counters of the reservation's windows now hold
        ``actual_tokens`` instead of the estimate."""
        delta = max(0, int(actual_tokens)) - reservation.estimated_tokens
        token_keys = [reservation.counter_keys[i] for i in _TOKEN_COUNTERS]
        await self._backend.adjust(token_keys, delta)

    async def release(self, reservation: Reservation) -> None:
        """The call produced nothing (it failed): give the estimated tokens back (the
        request itself stays counted)."""
        await self.record(reservation, 0)


def build_limiter(settings: LimitSettings) -> RateLimiter:
    backend: LimitBackend = (
        RedisLimitBackend.from_url(settings.redis_url)
        if settings.redis_url
        else InProcessLimitBackend()
    )
    return RateLimiter(settings, backend)

"""Rate limits and quotas: in-process and Redis, and across two processes sharing Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis as sync_redis
from _inference_support import WallClock, redis_prefix
from redis.asyncio import Redis

from ledgerlens.runtime.errors import ResourceExhausted
from ledgerlens.runtime.testing import RedisDatabase
from ledgerlens.services.inference.limits import (
    InProcessLimitBackend,
    LimitSettings,
    RateLimiter,
    RedisLimitBackend,
    build_limiter,
)

UNLIMITED = {
    "key_requests_per_minute": 0,
    "key_tokens_per_minute": 0,
    "key_tokens_per_day": 0,
    "tenant_requests_per_minute": 0,
    "tenant_tokens_per_minute": 0,
    "tenant_tokens_per_day": 0,
}


def _settings(**limits: int) -> LimitSettings:
    return LimitSettings.model_validate(
        {**UNLIMITED, **limits, "key_prefix": redis_prefix("limits")}
    )


@pytest.fixture
def clock() -> WallClock:
    return WallClock(1_767_225_600.0 + 5)  # 5 s into a minute and a UTC day


@pytest_asyncio.fixture(params=["memory", "redis"])
async def make_limiter(
    request: pytest.FixtureRequest, clock: WallClock
) -> AsyncIterator[Callable[..., RateLimiter]]:
    clients: list[Redis] = []

    def make(**limits: int) -> RateLimiter:
        settings = _settings(**limits)
        if request.param == "memory":
            return RateLimiter(settings, InProcessLimitBackend(clock=clock))
        db: RedisDatabase = request.getfixturevalue("redis_db")
        client = Redis.from_url(db.url)
        clients.append(client)
        return RateLimiter(settings, RedisLimitBackend(client))

    yield make
    for c in clients:
        await c.aclose()


async def test_requests_per_minute_refuses_with_retry_info(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    limiter = make_limiter(key_requests_per_minute=3)
    for _ in range(3):
        await limiter.check("k1", "t1", 10)
    with pytest.raises(ResourceExhausted) as err:
        await limiter.check("k1", "t1", 10)
    assert "key limit reached: 3 requests per minute" in err.value.message
    assert err.value.retry_after is not None
    assert 0 < err.value.retry_after <= 60
    assert err.value.metadata["limit"] == "requests per minute"
    await limiter.check("k2", "t1", 10)  # another key has its own budget


async def test_tenant_limit_spans_its_keys(make_limiter: Callable[..., RateLimiter]) -> None:
    limiter = make_limiter(tenant_requests_per_minute=2)
    await limiter.check("a", "t1", 0)
    await limiter.check("b", "t1", 0)
    with pytest.raises(ResourceExhausted, match="tenant limit reached: 2 requests per minute"):
        await limiter.check("c", "t1", 0)
    await limiter.check("a", "t2", 0)


async def test_tokens_are_reconciled_to_actual(make_limiter: Callable[..., RateLimiter]) -> None:
    limiter = make_limiter(key_tokens_per_minute=100)
    reservation = await limiter.check("k", "t", 60)
    with pytest.raises(ResourceExhausted, match="tokens per minute"):
        await limiter.check("k", "t", 50)  # 60 estimated + 50 > 100
    await limiter.record(reservation, 10)  # actual was 10
    second = await limiter.check("k", "t", 80)  # 10 + 80 <= 100
    with pytest.raises(ResourceExhausted):
        await limiter.check("k", "t", 20)
    await limiter.release(second)  # failed call: its estimate is given back
    await limiter.check("k", "t", 85)


async def test_request_larger_than_a_limit_is_refused_at_once(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    limiter = make_limiter(tenant_tokens_per_day=1000)
    with pytest.raises(ResourceExhausted, match="more than the tenant limit") as err:
        await limiter.check("k", "t", 1001)
    assert err.value.reason == "REQUEST_TOO_LARGE_FOR_LIMIT"


async def test_windows_roll_over_minute_and_utc_day(clock: WallClock) -> None:
    limiter = RateLimiter(
        _settings(key_requests_per_minute=1, key_tokens_per_day=100),
        InProcessLimitBackend(clock=clock),
    )
    await limiter.check("k", "t", 90)
    with pytest.raises(ResourceExhausted) as err:
        await limiter.check("k", "t", 1)
    assert err.value.retry_after == pytest.approx(55)
    clock.advance(60)
    with pytest.raises(ResourceExhausted, match="key limit reached: 100 tokens per day") as err:
        await limiter.check("k", "t", 20)
    assert err.value.reason == "QUOTA_EXHAUSTED"
    assert err.value.retry_after == pytest.approx(86_400 - 65)
    clock.advance(86_400)  # the next UTC day
    await limiter.check("k", "t", 100)


async def test_defaults_are_in_process() -> None:
    limiter = build_limiter(LimitSettings())
    assert isinstance(limiter._backend, InProcessLimitBackend)
    await limiter.check("k", "t", 10)


# Each process hits the limiter N times concurrently against the shared Redis.
_WORKER = """
import asyncio, json, sys
from ledgerlens.runtime.errors import ResourceExhausted
from ledgerlens.services.inference.limits import LimitSettings, build_limiter

async def main():
    url, prefix, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    settings = LimitSettings(
        redis_url=url, key_prefix=prefix, key_requests_per_minute=limit,
        key_tokens_per_minute=0, key_tokens_per_day=0, tenant_requests_per_minute=0,
        tenant_tokens_per_minute=0, tenant_tokens_per_day=0)
    limiter = build_limiter(settings)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    async def one():
        try:
            await limiter.check("shared-key", "shared-tenant", 1)
            return 1
        except ResourceExhausted:
            return 0
    admitted = sum(await asyncio.gather(*(one() for _ in range(n))))
    await limiter.aclose()
    print(json.dumps({"admitted": admitted}), flush=True)

asyncio.run(main())
"""


@pytest.mark.integration
def test_limit_holds_across_two_processes_sharing_redis(redis_db: RedisDatabase) -> None:
    client = sync_redis.Redis.from_url(redis_db.url)
    seconds, _ = client.time()
    if seconds % 60 > 50:  # keep the run inside one fixed minute window
        time.sleep(61 - seconds % 60)
    client.close()
    prefix, n, limit = redis_prefix("two-procs"), 40, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, redis_db.url, prefix, str(n), str(limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        admitted = [json.loads(p.communicate(timeout=60)[0])["admitted"] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sum(admitted) == limit


async def test_redis_counters_expire(redis_db: RedisDatabase) -> None:
    client = Redis.from_url(redis_db.url)
    try:
        limiter = RateLimiter(_settings(key_requests_per_minute=5), RedisLimitBackend(client))
        reservation = await limiter.check("k", "t", 3)
        ttls = [await client.pttl(k) for k in reservation.counter_keys]
        assert all(t > 0 for t in ttls)
        await asyncio.sleep(0)
    finally:
        await client.aclose()

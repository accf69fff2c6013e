"""Rate limits: the same behaviour on the in-process and the Redis limiter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.errors import ResourceExhausted
from ledgerlens.runtime.testing import RedisDatabase
from ledgerlens.services.identity.ratelimit import (
    InProcessRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    enforce,
)
from ledgerlens.services.identity.service import IdentityCore
from ledgerlens.services.identity.settings import Settings

#: builds a limiter of the backend under test (each call: a new instance / client)
LimiterFactory = Callable[[], RateLimiter]


@pytest_asyncio.fixture(params=["in-process", "redis"])
async def limiter_factory(request: pytest.FixtureRequest) -> AsyncIterator[LimiterFactory]:
    clients: list[Redis] = []
    if request.param == "in-process":
        shared = InProcessRateLimiter()

        def make() -> RateLimiter:
            return shared  # one process, one limiter

        yield make
        return
    db: RedisDatabase = request.getfixturevalue("redis_db")

    def make_redis() -> RateLimiter:
        client = Redis.from_url(db.url)
        clients.append(client)
        return RedisRateLimiter(client, prefix=db.key_prefix + ":rl:")

    try:
        yield make_redis
    finally:
        for client in clients:
            await client.aclose()


async def test_limit_then_refused_with_retry_after(limiter_factory: LimiterFactory) -> None:
    limiter = limiter_factory()
    for _ in range(5):
        assert await limiter.hit("key:a", 5) == (True, 0.0)
    allowed, retry_after = await limiter.hit("key:a", 5)
    assert not allowed
    assert 0 < retry_after <= 60
    with pytest.raises(ResourceExhausted) as err:
        await enforce(limiter, "key:a", 5, "API key")
    assert err.value.retry_after is not None
    assert err.value.retry_after > 0
    # another bucket is independent
    assert (await limiter.hit("key:b", 5))[0]


async def test_concurrent_hits_allow_exactly_the_limit(limiter_factory: LimiterFactory) -> None:
    one, two = limiter_factory(), limiter_factory()  # two clients for Redis
    results = await asyncio.gather(
        *(((one if i % 2 else two).hit("shared", 20)) for i in range(50))
    )
    assert sum(1 for allowed, _ in results if allowed) == 20
    assert all(retry > 0 for allowed, retry in results if not allowed)


async def test_in_process_window_slides() -> None:
    now = [1000.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    for t in (0, 10, 20):
        now[0] = 1000.0 + t
        assert (await limiter.hit("k", 3))[0]
    now[0] = 1030.0
    allowed, retry = await limiter.hit("k", 3)
    assert not allowed
    assert retry == pytest.approx(30.0)  # when the hit at t=0 leaves the window
    now[0] = 1060.5
    assert (await limiter.hit("k", 3))[0]
    assert not (await limiter.hit("k", 3))[0]  # hits at 10 and 20 are still inside


async def test_redis_window_slides(redis_db: RedisDatabase) -> None:
    client = Redis.from_url(redis_db.url)
    try:
        limiter = RedisRateLimiter(client, prefix=redis_db.key_prefix, window_seconds=0.3)
        assert (await limiter.hit("k", 1))[0]
        allowed, retry = await limiter.hit("k", 1)
        assert not allowed
        assert 0 < retry <= 0.3
        await asyncio.sleep(0.35)
        assert (await limiter.hit("k", 1))[0]
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def limited_core(
    engine: AsyncEngine, tmp_path: Path, limiter_factory: LimiterFactory, kek: bytes
) -> AsyncIterator[IdentityCore]:
    settings = Settings(
        data_dir=str(tmp_path),
        token_rate_per_key_per_minute=3,
        token_rate_per_address_per_minute=5,
    )
    core = IdentityCore(settings, engine, rate_limiter=limiter_factory(), kek=kek)
    await core.start()
    yield core
    await core.close()


async def test_issue_token_per_key_and_per_address_limits(limited_core: IdentityCore) -> None:
    core = limited_core
    keys: list[Any] = [await core.create_key("acme", f"k{i}", ["search:read"]) for i in range(3)]
    (k0, s0), (k1, s1), (k2, s2) = ((r.key_id, s) for r, s in keys)
    # per key: 3 a minute, whatever the address
    for i in range(3):
        await core.issue_token(k0, s0, client_address=f"10.0.0.{i}")
    with pytest.raises(ResourceExhausted) as per_key:
        await core.issue_token(k0, s0, client_address="10.0.0.99")
    assert per_key.value.retry_after is not None
    assert per_key.value.retry_after > 0
    assert "API key" in per_key.value.message
    # per address: 5 a minute, whatever the key (address 10.0.0.1 used 1 already)
    await core.issue_token(k1, s1, client_address="10.0.0.1")
    await core.issue_token(k1, s1, client_address="10.0.0.1")
    await core.issue_token(k2, s2, client_address="10.0.0.1")
    await core.issue_token(k2, s2, client_address="10.0.0.1")
    with pytest.raises(ResourceExhausted) as per_address:
        await core.issue_token(k2, s2, client_address="10.0.0.1")
    assert "client address" in per_address.value.message
    assert per_address.value.retry_after is not None
    assert per_address.value.retry_after > 0
    # key k2 has one token left from another address
    await core.issue_token(k2, s2, client_address="10.0.0.7")


async def test_rate_limit_applies_before_authentication(limited_core: IdentityCore) -> None:
    core = limited_core
    record, secret = await core.create_key("acme", "k", ["search:read"])
    for _ in range(3):
        await core.issue_token(record.key_id, secret, client_address="10.1.1.1")
    # even a wrong secret is refused as limited, not checked (no hashing for floods)
    with pytest.raises(ResourceExhausted):
        await core.issue_token(record.key_id, "lls_wrong", client_address="10.1.1.2")

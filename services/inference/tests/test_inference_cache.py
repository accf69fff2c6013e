"""Response and embedding caches: in-process LRU with TTL, and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from _inference_support import WallClock, redis_prefix
from redis.asyncio import Redis

from ledgerlens.runtime.testing import RedisDatabase
from ledgerlens.services.inference.cache import (
    CacheSettings,
    InProcessLRU,
    RedisByteCache,
    ResponseCache,
    build_cache,
    chat_cache_key,
)
from ledgerlens.services.inference.model import ChatParams, Message


def _params(content: str = "what is EIP-1559?", temperature: float | None = 0) -> ChatParams:
    return ChatParams(
        model="m", messages=(Message("user", content),), temperature=temperature, max_tokens=64
    )


@pytest_asyncio.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[ResponseCache]:
    settings = CacheSettings(key_prefix=redis_prefix("cache"))
    if request.param == "memory":
        yield ResponseCache(settings, InProcessLRU(100))
        return
    db: RedisDatabase = request.getfixturevalue("redis_db")
    client = Redis.from_url(db.url)
    try:
        yield ResponseCache(settings, RedisByteCache(client))
    finally:
        await client.aclose()


async def test_deterministic_chat_is_cached_per_namespace(cache: ResponseCache) -> None:
    params = _params()
    assert await cache.get_chat(params, "t1") is None
    assert await cache.put_chat(params, "t1", b"response")
    assert await cache.get_chat(params, "t1") == b"response"
    assert await cache.get_chat(_params(), "t1") == b"response"  # equal request
    assert await cache.get_chat(params, "t2") is None  # another tenant
    assert await cache.get_chat(_params("other"), "t1") is None


async def test_non_deterministic_chat_is_not_cached(cache: ResponseCache) -> None:
    for temperature in (None, 0.7):
        params = _params(temperature=temperature)
        assert chat_cache_key(params, "t") is None
        assert not await cache.put_chat(params, "t", b"x")
        assert await cache.get_chat(params, "t") is None


async def test_embeddings_round_trip_in_input_order(cache: ResponseCache) -> None:
    await cache.put_embeddings("minilm", ["a", "b"], [[0.5, -0.25], [1.0, 0.0]])
    found = await cache.get_embeddings("minilm", ["b", "x", "a"])
    assert found == [[1.0, 0.0], None, [0.5, -0.25]]
    assert await cache.get_embeddings("other-model", ["a"]) == [None]


def test_cache_key_covers_the_canonical_request() -> None:
    base = chat_cache_key(_params(), "t")
    variants = [
        ChatParams(model="m2", messages=_params().messages, temperature=0, max_tokens=64),
        ChatParams(model="m", messages=_params().messages, temperature=0, max_tokens=65),
        ChatParams(
            model="m", messages=_params().messages, temperature=0, max_tokens=64, stop=("x",)
        ),
        ChatParams(
            model="m",
            messages=(Message("system", "what is EIP-1559?"),),
            temperature=0,
            max_tokens=64,
        ),
    ]
    assert all(chat_cache_key(v, "t") != base for v in variants)


async def test_lru_evicts_least_recently_used_and_expires() -> None:
    clock = WallClock()
    lru = InProcessLRU(2, clock=clock)
    await lru.set_many([("a", b"1"), ("b", b"2")], ttl_seconds=10)
    assert await lru.get_many(["a"]) == [b"1"]  # a is now most recent
    await lru.set_many([("c", b"3")], ttl_seconds=10)
    assert await lru.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    clock.advance(11)
    assert await lru.get_many(["a", "c"]) == [None, None]
    assert len(lru) == 0


async def test_disabled_cache_always_misses() -> None:
    cache = build_cache(CacheSettings(enabled=False))
    assert not await cache.put_chat(_params(), "t", b"x")
    await cache.put_embeddings("m", ["a"], [[1.0]])
    assert await cache.get_embeddings("m", ["a"]) == [None]


async def test_redis_entries_carry_a_ttl(redis_db: RedisDatabase) -> None:
    settings = CacheSettings(
        redis_url=redis_db.url, key_prefix=redis_prefix("ttl"), response_ttl_seconds=30
    )
    cache = build_cache(settings)
    try:
        await cache.put_chat(_params(), "t", b"x")
        client = Redis.from_url(redis_db.url)
        keys = await client.keys(settings.key_prefix + "*")
        assert len(keys) == 1
        assert 0 < await client.pttl(keys[0]) <= 30_000
        await client.aclose()
    finally:
        await cache.aclose()

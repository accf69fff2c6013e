"""Idempotency keys, in-process and on Redis: single-flight, replay, TTL, key reuse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
from _inference_support import redis_prefix

from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.runtime.testing import RedisDatabase
from ledgerlens.services.inference.idempotency import (
    Idempotency,
    IdempotencySettings,
    InProcessIdempotency,
    RedisIdempotency,
    build_idempotency,
    idempotency_scope,
    pack_frames,
    request_fingerprint,
    unpack_frames,
)

Factory = Callable[..., Idempotency]


@pytest_asyncio.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    made: list[Idempotency] = []

    def factory(**overrides: float) -> Idempotency:
        settings = IdempotencySettings.model_validate(
            {"key_prefix": redis_prefix("idem"), "poll_interval_seconds": 0.01, **overrides}
        )
        store: Idempotency
        if request.param == "memory":
            store = InProcessIdempotency(settings)
        else:
            db: RedisDatabase = request.getfixturevalue("redis_db")
            store = RedisIdempotency.from_url(settings, db.url)
        made.append(store)
        return store

    yield factory
    for s in made:
        await s.aclose()


class Producer:
    def __init__(self, delay: float = 0.05, fail_times: int = 0) -> None:
        self.calls = 0
        self.delay = delay
        self.fail_times = fail_times

    async def __call__(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.calls <= self.fail_times:
            raise RuntimeError("provider failed")
        return f"result-{self.calls}".encode()


SCOPE = idempotency_scope("tenant", "key", "Chat")


async def test_concurrent_duplicates_run_the_provider_once(make: Factory) -> None:
    store = make()
    produce = Producer(delay=0.1)
    results = await asyncio.gather(*(store.run(SCOPE, "k-1", "fp", produce) for _ in range(10)))
    assert produce.calls == 1
    assert {data for data, _ in results} == {b"result-1"}
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 9
    assert await store.run(SCOPE, "k-1", "fp", produce) == (b"result-1", True)
    assert produce.calls == 1


async def test_scopes_and_keys_are_separate(make: Factory) -> None:
    store = make()
    produce = Producer(delay=0)
    await store.run(SCOPE, "k", "fp", produce)
    await store.run(SCOPE, "other", "fp", produce)
    await store.run(idempotency_scope("tenant", "key2", "Chat"), "k", "fp", produce)
    assert produce.calls == 3


async def test_same_key_different_request_is_invalid_argument(make: Factory) -> None:
    store = make()
    produce = Producer(delay=0.1)
    first = asyncio.create_task(store.run(SCOPE, "k", "fp-a", produce))
    await asyncio.sleep(0.03)  # in flight
    with pytest.raises(InvalidArgument, match="different request") as err:
        await store.run(SCOPE, "k", "fp-b", produce)
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert err.value.violations[0][0] == "idempotency_key"
    await first
    with pytest.raises(InvalidArgument):  # and once stored
        await store.run(SCOPE, "k", "fp-b", produce)


async def test_result_expires_after_ttl(make: Factory) -> None:
    store = make(ttl_seconds=0.2)
    produce = Producer(delay=0)
    assert await store.run(SCOPE, "k", "fp", produce) == (b"result-1", False)
    assert await store.run(SCOPE, "k", "fp", produce) == (b"result-1", True)
    await asyncio.sleep(0.3)
    assert await store.run(SCOPE, "k", "fp", produce) == (b"result-2", False)


async def test_failed_first_call_releases_the_key(make: Factory) -> None:
    store = make()
    produce = Producer(delay=0.05, fail_times=1)
    with pytest.raises(RuntimeError):
        await store.run(SCOPE, "k", "fp", produce)
    assert await store.run(SCOPE, "k", "fp", produce) == (b"result-2", False)


async def test_waiters_take_over_when_the_first_call_fails(make: Factory) -> None:
    store = make()
    produce = Producer(delay=0.05, fail_times=1)
    results = await asyncio.gather(
        *(store.run(SCOPE, "k", "fp", produce) for _ in range(5)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1
    assert produce.calls == 2
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert {d for d, _ in ok} == {b"result-2"}
    assert sorted(rep for _, rep in ok) == [False, True, True, True]


async def test_redis_lock_is_renewed_for_slow_producers(redis_db: RedisDatabase) -> None:
    settings = IdempotencySettings(
        key_prefix=redis_prefix("idem-slow"), lock_seconds=0.15, poll_interval_seconds=0.01
    )
    store = RedisIdempotency.from_url(settings, redis_db.url)
    try:
        produce = Producer(delay=0.5)  # outlives the lock three times over
        results = await asyncio.gather(*(store.run(SCOPE, "k", "fp", produce) for _ in range(3)))
        assert produce.calls == 1
        assert {d for d, _ in results} == {b"result-1"}
    finally:
        await store.aclose()


def test_fingerprint_ignores_the_key_and_frames_round_trip() -> None:
    a = inference_pb2.ChatRequest(model="m", idempotency_key="one")
    a.messages.add(role=inference_pb2.ROLE_USER, content="hi")
    b = inference_pb2.ChatRequest()
    b.CopyFrom(a)
    b.idempotency_key = "two"
    assert request_fingerprint(a) == request_fingerprint(b)
    b.messages[0].content = "hello"
    assert request_fingerprint(a) != request_fingerprint(b)
    frames = [b"", b"delta", bytes(range(256))]
    assert unpack_frames(pack_frames(frames)) == frames


def test_default_is_in_process() -> None:
    assert isinstance(build_idempotency(IdempotencySettings()), InProcessIdempotency)

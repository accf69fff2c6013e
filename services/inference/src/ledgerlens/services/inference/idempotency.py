"""Idempotency keys: a request repeated with the same key returns the first result for
24 h, and concurrent duplicates run the provider once (single-flight).

    scope = idempotency_scope(tenant_id, api_key_id, "Chat")
    data, replayed = await idempotency.run(
        scope, request.idempotency_key, request_fingerprint(request), produce)

``produce`` returns the response as bytes (a serialized protobuf response, or
:func:`pack_frames` of a stream's serialized events). A key reused within the TTL with
a different request (another fingerprint) is :class:`InvalidArgument` (reason
``IDEMPOTENCY_KEY_REUSED``), like Stripe's 422: the client has a bug, retrying will not
help. A first call that fails stores nothing and releases the key, so a retry (or a
waiting duplicate) runs again.

In-process: a dict of futures. Redis: ``SET lock NX PX`` elects the producer (the lock
is extended while it runs, so a crashed producer frees it within ``lock_seconds``);
the result is stored and the lock deleted in one Lua script; duplicates poll every
``poll_interval_seconds`` until the result appears or the lock is gone (then one of
them takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from ledgerlens.runtime.errors import InvalidArgument

__all__ = [
    "Idempotency",
    "IdempotencySettings",
    "InProcessIdempotency",
    "RedisIdempotency",
    "build_idempotency",
    "idempotency_scope",
    "pack_frames",
    "request_fingerprint",
    "unpack_frames",
]

_log = logging.getLogger(__name__)

Produce = Callable[[], Awaitable[bytes]]


class IdempotencySettings(BaseModel):
    redis_url: str | None = None
    key_prefix: str = "ledgerlens:inference:idem:"
    #: how long a result is replayed
    ttl_seconds: float = Field(default=86_400.0, gt=0)
    #: a producer's lock lives this long without renewal (renewed every third of it)
    lock_seconds: float = Field(default=30.0, gt=0)
    poll_interval_seconds: float = Field(default=0.05, gt=0)
    #: in-process: results kept at most (oldest dropped first)
    max_entries: int = Field(default=100_000, ge=1)


def idempotency_scope(tenant_id: str, api_key_id: str, rpc: str) -> str:
    return f"{tenant_id}/{api_key_id}/{rpc}"


def request_fingerprint(request: Message, *, ignore: Sequence[str] = ("idempotency_key",)) -> str:
    """sha256 of the request's deterministic serialization, without ``ignore`` fields."""
    copy = type(request)()
    copy.CopyFrom(request)
    for name in ignore:
        if name in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def pack_frames(frames: Sequence[bytes]) -> bytes:
    """Several byte strings (a stream's serialized events) as one value."""
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


def unpack_frames(data: bytes) -> list[bytes]:
    frames: list[bytes] = []
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        frames.append(data[offset : offset + size])
        offset += size
    return frames


def _reused(key: str) -> InvalidArgument:
    return InvalidArgument(
        "idempotency_key was already used with a different request; use a new key",
        [("idempotency_key", "already used with a different request in the last 24 h")],
        reason="IDEMPOTENCY_KEY_REUSED",
    )


def _storage_key(scope: str, key: str) -> str:
    return hashlib.sha256(f"{scope}\x00{key}".encode()).hexdigest()


class Idempotency(Protocol):
    async def run(
        self, scope: str, key: str, request_fingerprint: str, produce: Produce
    ) -> tuple[bytes, bool]:
        """The first result for (scope, key) and whether it is a replay."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class _Entry:
    fingerprint: str
    future: asyncio.Future[bytes]
    expires_at: float = field(default=float("inf"))


class InProcessIdempotency:
    def __init__(
        self, settings: IdempotencySettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = settings.ttl_seconds
        self._max = settings.max_entries
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    async def run(
        self, scope: str, key: str, request_fingerprint: str, produce: Produce
    ) -> tuple[bytes, bool]:
        skey = _storage_key(scope, key)
        while True:
            entry = self._entries.get(skey)
            if entry is not None and entry.expires_at <= self._clock():
                del self._entries[skey]
                entry = None
            if entry is None:
                return await self._produce(skey, request_fingerprint, produce), False
            if entry.fingerprint != request_fingerprint:
                raise _reused(key)
            future = entry.future
            # wait() never cancels the future: a cancelled duplicate leaves the producer be
            await asyncio.wait({future})
            if future.cancelled() or future.exception() is not None:
                continue  # the first call failed: the key is free again, retry
            return future.result(), True

    async def _produce(self, skey: str, fingerprint: str, produce: Produce) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if len(self._entries) >= self._max:
            self._evict()
        self._entries[skey] = _Entry(fingerprint, future)
        try:
            data = await produce()
        except BaseException as exc:
            # release the key, then wake the duplicates (they retry and one produces)
            self._entries.pop(skey, None)
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning
            raise
        self._entries[skey].expires_at = self._clock() + self._ttl
        future.set_result(data)
        return data

    def _evict(self) -> None:
        now = self._clock()
        for k in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[k]
        while len(self._entries) >= self._max:
            oldest = next(
                (k for k, e in self._entries.items() if e.future.done()), None
            )  # dicts keep insertion order: the first done one is the oldest result
            if oldest is None:
                return
            del self._entries[oldest]

    async def aclose(self) -> None:
        return None


# KEYS: result, lock. ARGV: value, ttl ms, lock token. Stores the result and releases
# the lock only if this producer still holds it (else another took over; its result wins).
_STORE = """
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""
# KEYS: lock. ARGV: token, ms. Extends (ms > 0) or deletes (ms == 0) the lock if held.
_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _encode(fingerprint: str, data: bytes) -> bytes:
    fp = fingerprint.encode()
    return struct.pack(">H", len(fp)) + fp + data


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()


def _decode(value: bytes) -> tuple[str, bytes]:
    (size,) = struct.unpack_from(">H", value, 0)
    return value[2 : 2 + size].decode(), value[2 + size :]


class RedisIdempotency:
    def __init__(
        self,
        settings: IdempotencySettings,
        client: Redis,
        *,
        owns_client: bool = False,
    ) -> None:
        self._prefix = settings.key_prefix
        self._ttl_ms = max(1, int(settings.ttl_seconds * 1000))
        self._lock_ms = max(1, int(settings.lock_seconds * 1000))
        self._poll = settings.poll_interval_seconds
        self._client = client
        self._owns = owns_client
        self._store = client.register_script(_STORE)
        self._lock = client.register_script(_LOCK)

    @classmethod
    def from_url(cls, settings: IdempotencySettings, url: str) -> RedisIdempotency:
        return cls(settings, Redis.from_url(url), owns_client=True)

    async def aclose(self) -> None:
        if self._owns:
            await self._client.aclose()

    async def run(
        self, scope: str, key: str, request_fingerprint: str, produce: Produce
    ) -> tuple[bytes, bool]:
        base = self._prefix + _storage_key(scope, key)
        result_key, lock_key = base + ":result", base + ":lock"
        token = f"{request_fingerprint}|{secrets.token_hex(8)}"
        while True:
            replay = await self._stored(result_key, key, request_fingerprint)
            if replay is not None:
                return replay, True
            if await self._client.set(lock_key, token, nx=True, px=self._lock_ms):
                # a producer may have finished between our GET and SET
                replay = await self._stored(result_key, key, request_fingerprint)
                if replay is not None:
                    await self._lock(keys=[lock_key], args=[token, 0])
                    return replay, True
                return await self._produce(result_key, lock_key, token, produce), False
            holder = await self._client.get(lock_key)
            if holder is not None and _text(holder).split("|", 1)[0] != request_fingerprint:
                raise _reused(key)
            await asyncio.sleep(self._poll)

    async def _stored(self, result_key: str, key: str, fingerprint: str) -> bytes | None:
        value = await self._client.get(result_key)
        if value is None:
            return None
        stored_fp, data = _decode(value.encode() if isinstance(value, str) else value)
        if stored_fp != fingerprint:
            raise _reused(key)
        return data

    async def _produce(self, result_key: str, lock_key: str, token: str, produce: Produce) -> bytes:
        renew = asyncio.create_task(self._renew(lock_key, token))
        try:
            data = await produce()
        except BaseException:
            renew.cancel()
            # release so a retry (or a waiting duplicate) runs; shielded from our own
            # cancellation, else a cancelled first call would hold the key until expiry
            with contextlib.suppress(Exception):
                await asyncio.shield(self._lock(keys=[lock_key], args=[token, 0]))
            raise
        renew.cancel()
        fingerprint = token.split("|", 1)[0]
        stored = await self._store(
            keys=[result_key, lock_key], args=[_encode(fingerprint, data), self._ttl_ms, token]
        )
        if not int(stored):
            _log.warning("idempotency lock lost before the result was stored (a duplicate ran)")
        return data

    async def _renew(self, lock_key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ms / 3000)
            await self._lock(keys=[lock_key], args=[token, self._lock_ms])


def build_idempotency(settings: IdempotencySettings) -> Idempotency:
    if settings.redis_url:
        return RedisIdempotency.from_url(settings, settings.redis_url)
    return InProcessIdempotency(settings)

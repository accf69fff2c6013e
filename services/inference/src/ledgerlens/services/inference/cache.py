"""Response and embedding caches: in-process LRU with TTL by default, Redis at scale.

* **Chat/answer responses**: only deterministic requests (temperature 0) are cached,
  keyed by the sha256 of the canonical request (namespace, model, messages,
  max_tokens, stop). The gateway's namespace is (tenant, API key, RPC), so a cache
  never answers (or reveals, through timing) another tenant's or another key's prompts,
  and a revoked key's answers never reach a new key. Values are bytes (the
  serialized response). A hit is reported with ``cached=true`` and cost 0.
* **Embeddings**: keyed by (model, sha256 of the text); values are float32 vectors
  (:func:`pack_vector`). Embeddings do not depend on who asked, so no namespace.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from ledgerlens.services.inference.metrics import CACHE
from ledgerlens.services.inference.model import ChatParams

__all__ = [
    "ByteCache",
    "CacheSettings",
    "InProcessLRU",
    "RedisByteCache",
    "ResponseCache",
    "build_cache",
    "chat_cache_key",
    "embedding_cache_key",
    "pack_vector",
    "unpack_vector",
]


class CacheSettings(BaseModel):
    enabled: bool = True
    redis_url: str | None = None
    key_prefix: str = "ledgerlens:inference:cache:"
    #: in-process: entries kept (least recently used dropped first)
    max_entries: int = Field(default=10_000, ge=1)
    response_ttl_seconds: float = Field(default=3_600.0, gt=0)
    embedding_ttl_seconds: float = Field(default=7 * 86_400.0, gt=0)


class ByteCache(Protocol):
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_seconds: float) -> None: ...

    async def aclose(self) -> None: ...


class InProcessLRU:
    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic):
        self._max = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        found: list[bytes | None] = []
        for key in keys:
            entry = self._data.get(key)
            if entry is None or entry[1] <= now:
                if entry is not None:
                    del self._data[key]
                found.append(None)
            else:
                self._data.move_to_end(key)
                found.append(entry[0])
        return found

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_seconds: float) -> None:
        expires = self._clock() + ttl_seconds
        for key, value in items:
            self._data[key] = (value, expires)
            self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    async def aclose(self) -> None:
        return None


class RedisByteCache:
    def __init__(self, client: Redis, *, owns_client: bool = False) -> None:
        self._client = client
        self._owns = owns_client

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        values = await self._client.mget(list(keys))
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_seconds: float) -> None:
        if not items:
            return
        ttl_ms = max(1, int(ttl_seconds * 1000))
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value, px=ttl_ms)
            await pipe.execute()

    async def aclose(self) -> None:
        if self._owns:
            await self._client.aclose()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chat_cache_key(params: ChatParams, namespace: str) -> str | None:
    """The cache key of a deterministic request, else ``None`` (not cacheable)."""
    if not params.deterministic:
        return None
    canonical = json.dumps(
        {
            "ns": namespace,
            "model": params.model,
            "messages": [[m.role, m.content] for m in params.messages],
            "max_tokens": params.max_tokens,
            "stop": list(params.stop),
        },
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )
    return "chat:" + _sha256(canonical)


def embedding_cache_key(model: str, text: str) -> str:
    return f"emb:{_sha256(model)[:16]}:{_sha256(text)}"


def pack_vector(vector: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)


def unpack_vector(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 4}f", data))


class ResponseCache:
    """The gateway's caches over one :class:`ByteCache` (disabled: always a miss)."""

    def __init__(self, settings: CacheSettings, backend: ByteCache) -> None:
        self.settings = settings
        self._backend = backend
        self._prefix = settings.key_prefix

    async def aclose(self) -> None:
        await self._backend.aclose()

    async def get_chat(self, params: ChatParams, namespace: str) -> bytes | None:
        key = chat_cache_key(params, namespace)
        if key is None or not self.settings.enabled:
            return None
        found = (await self._backend.get_many([self._prefix + key]))[0]
        CACHE.labels("response", "miss" if found is None else "hit").inc()
        return found

    async def put_chat(self, params: ChatParams, namespace: str, value: bytes) -> bool:
        """Store a deterministic response; returns whether it was cacheable."""
        key = chat_cache_key(params, namespace)
        if key is None or not self.settings.enabled:
            return False
        await self._backend.set_many(
            [(self._prefix + key, value)], self.settings.response_ttl_seconds
        )
        return True

    async def get_embeddings(self, model: str, texts: Sequence[str]) -> list[list[float] | None]:
        """Cached vectors in input order (``None`` where missing)."""
        if not self.settings.enabled:
            return [None] * len(texts)
        keys = [self._prefix + embedding_cache_key(model, t) for t in texts]
        found = await self._backend.get_many(keys)
        hits = sum(v is not None for v in found)
        if hits:
            CACHE.labels("embeddings", "hit").inc(hits)
        if len(found) > hits:
            CACHE.labels("embeddings", "miss").inc(len(found) - hits)
        return [None if v is None else unpack_vector(v) for v in found]

    async def put_embeddings(
        self, model: str, texts: Sequence[str], vectors: Sequence[Sequence[float]]
    ) -> None:
        if not self.settings.enabled:
            return
        items = [
            (self._prefix + embedding_cache_key(model, t), pack_vector(v))
            for t, v in zip(texts, vectors, strict=True)
        ]
        await self._backend.set_many(items, self.settings.embedding_ttl_seconds)


def build_cache(settings: CacheSettings) -> ResponseCache:
    backend: ByteCache = (
        RedisByteCache(Redis.from_url(settings.redis_url), owns_client=True)
        if settings.redis_url
        else InProcessLRU(settings.max_entries)
    )
    return ResponseCache(settings, backend)

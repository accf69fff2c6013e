"""Pytest plugin (entry point ``ledgerlens_embedding``): a real embedder for tests.

``local_embedder`` is session-scoped because loading the model takes seconds. It is a
synchronous fixture on purpose: it is not bound to any event loop, and every test's own
loop can ``await local_embedder.embed(...)`` (the model runs on its own worker thread).

``cached_embedder`` is the same model behind a cache of the session's vectors: the
model on this CPU embeds about 20 chunks of 200 tokens a second, so the EIP corpus
costs minutes, and tests that ingest it on SQLite and again on PostgreSQL (or index it
in retrieval) embed each text once per session. With ``LEDGERLENS_TEST_EMBEDDING_CACHE``
set to a directory the cache also persists between sessions (a developer's reruns);
CI leaves it unset and embeds for real.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from ledgerlens.embedding.base import Embedder, Tokenizer
from ledgerlens.embedding.local import LocalEmbedder

__all__ = ["CachingEmbedder", "cached_embedder", "local_embedder"]

ENV_CACHE_DIR = "LEDGERLENS_TEST_EMBEDDING_CACHE"


class CachingEmbedder:
    """An :class:`Embedder` that embeds each distinct text once (tests only: the cache
    grows without bound)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model: str = inner.model
        self.dimensions: int = inner.dimensions
        self.max_tokens: int = inner.max_tokens
        self.tokenizer: Tokenizer = inner.tokenizer
        self._vectors: dict[str, list[float]] = {}
        #: texts actually sent to the model (what the cache saved is the rest)
        self.embedded = 0

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        keys = [self._key(t) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self._vectors:
                missing.setdefault(key, text)
        if missing:
            vectors = await self.inner.embed(list(missing.values()))
            self.embedded += len(missing)
            self._vectors.update(zip(missing, vectors, strict=True))
        return [self._vectors[key] for key in keys]

    async def aclose(self) -> None:
        """The inner embedder belongs to its own fixture."""

    def load(self, path: Path) -> None:
        if path.exists():
            with np.load(path) as data:
                self._vectors.update(
                    zip(data["keys"].tolist(), data["vectors"].tolist(), strict=True)
                )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(self._vectors), dtype="U64")
        vectors = np.array(list(self._vectors.values()), dtype=np.float32)
        np.savez(path, keys=keys, vectors=vectors)


@pytest.fixture(scope="session")
def local_embedder() -> Iterator[LocalEmbedder]:
    """The bundled all-MiniLM-L6-v2, loaded once per test session, offline."""
    embedder = LocalEmbedder.load()
    yield embedder
    embedder.close()


@pytest.fixture(scope="session")
def cached_embedder(local_embedder: LocalEmbedder) -> Iterator[CachingEmbedder]:
    """``local_embedder`` embedding each distinct text once per session (see module)."""
    embedder = CachingEmbedder(local_embedder)
    cache_dir = os.environ.get(ENV_CACHE_DIR)
    path = Path(cache_dir) / f"{local_embedder.model}.npz" if cache_dir else None
    if path is not None:
        embedder.load(path)
    yield embedder
    if path is not None:
        embedder.save(path)

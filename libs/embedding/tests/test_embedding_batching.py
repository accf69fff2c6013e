"""The embedding queue packs concurrent documents' chunks into full model batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from ledgerlens.embedding import EmbeddingError, OpenAIEmbedder
from ledgerlens.embedding.batching import EmbeddingQueue
from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.runtime.net import free_port


class Recording:
    """The real (cached) model, recording the batches it is given."""

    def __init__(self, inner: CachingEmbedder) -> None:
        self.inner = inner
        self.model = inner.model
        self.dimensions = inner.dimensions
        self.max_tokens = inner.max_tokens
        self.tokenizer = inner.tokenizer
        self.batches: list[int] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.batches.append(len(texts))
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        pass


async def test_concurrent_callers_share_full_batches(cached_embedder: CachingEmbedder) -> None:
    model = Recording(cached_embedder)
    queue = EmbeddingQueue(model, batch_size=32)
    queue.start()
    try:
        docs = [[f"document {d} chunk {i} about gas" for i in range(20)] for d in range(3)]
        results = await asyncio.gather(*(queue.embed(texts) for texts in docs))
    finally:
        await queue.stop()
    assert model.batches == [32, 28]  # not [20, 20, 20]
    for texts, vectors in zip(docs, results, strict=True):
        assert vectors == await cached_embedder.embed(texts)  # each caller gets its own


async def test_a_caller_that_gives_up_is_skipped(cached_embedder: CachingEmbedder) -> None:
    model = Recording(cached_embedder)
    queue = EmbeddingQueue(model, batch_size=4)
    queue.start()
    try:
        first = asyncio.create_task(queue.embed([f"first {i}" for i in range(4)]))
        gone = asyncio.create_task(queue.embed([f"gone {i}" for i in range(8)]))
        await asyncio.sleep(0)  # both queued
        gone.cancel()
        last = await queue.embed(["last"])
        assert len(await first) == 4
        assert len(last) == 1
    finally:
        await queue.stop()
    assert sum(model.batches) == 5  # the cancelled caller's 8 texts were never embedded


async def test_a_failing_model_fails_every_waiting_caller() -> None:
    # a real OpenAI-compatible client against a port nobody listens on
    dead = OpenAIEmbedder(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        model="all-MiniLM-L6-v2",
        dimensions=384,
        max_tokens=254,
        max_retries=1,
        retry_backoff_seconds=0.01,
    )
    queue = EmbeddingQueue(dead, batch_size=8)
    queue.start()
    try:
        outcomes = await asyncio.gather(
            queue.embed(["a", "b"]), queue.embed(["c"]), return_exceptions=True
        )
    finally:
        await queue.stop()
        await dead.aclose()
    assert all(isinstance(o, EmbeddingError) for o in outcomes), outcomes


def test_batch_size_must_be_positive(cached_embedder: CachingEmbedder) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EmbeddingQueue(cached_embedder, batch_size=0)

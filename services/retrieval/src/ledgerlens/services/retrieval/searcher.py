"""A search from validated query to ranked, hydrated results.

1. The query is embedded (skipped for keyword-only): concurrent searches share model
   batches, and recent query vectors are kept in an LRU cache (a repeated query, e.g.
   from a dashboard or a retried call, costs no model time).
2. Dense and keyword candidates (``candidates`` each, at least ``top_k``) are taken
   under the filter, then fused (:mod:`.fusion`).
3. ``min_score`` drops low scores; the best ``top_k`` are hydrated with their chunk,
   provenance and ledger anchor. A tombstoned version is never returned, even in the
   instant between its retirement and its removal from the index.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ledgerlens.embedding import EmbeddingError
from ledgerlens.embedding.batching import EmbeddingQueue
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.errors import NotFound, Unavailable
from ledgerlens.services.retrieval.fusion import Fused, fuse
from ledgerlens.services.retrieval.index import VectorBackend
from ledgerlens.services.retrieval.indexer import IndexState
from ledgerlens.services.retrieval.keyword import KeywordIndex
from ledgerlens.services.retrieval.model import Hit, unit
from ledgerlens.services.retrieval.requests import Query

__all__ = ["SearchOutcome", "Searcher"]

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    results: list[retrieval_pb2.SearchResult]
    fusion: int
    took_micros: int


class _QueryCache:
    # An LRU over an OrderedDict: functools.lru_cache cannot wrap an async batched call.
    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, Vector] = OrderedDict()

    def get(self, text: str) -> Vector | None:
        vector = self._items.get(text)
        if vector is not None:
            self._items.move_to_end(text)
        return vector

    def put(self, text: str, vector: Vector) -> None:
        if self._size <= 0:
            return
        self._items[text] = vector
        self._items.move_to_end(text)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class Searcher:
    def __init__(
        self,
        backend: VectorBackend,
        keyword: KeywordIndex,
        state: IndexState,
        queue: EmbeddingQueue,
        *,
        candidates: int = 50,
        rrf_k: int = 60,
        query_cache_size: int = 10_000,
    ) -> None:
        self.backend = backend
        self.keyword = keyword
        self.state = state
        self.queue = queue
        self.candidates = candidates
        self.rrf_k = rrf_k
        self._cache = _QueryCache(query_cache_size)

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        """Query vectors in order; the missing ones embedded in one batch."""
        found: dict[str, Vector] = {}
        missing: list[str] = []
        for text in texts:
            cached = self._cache.get(text)
            if cached is None:
                if text not in missing:
                    missing.append(text)
            else:
                found[text] = cached
        if missing:
            try:
                vectors = await self.queue.embed(missing)
            except EmbeddingError as exc:
                raise Unavailable(f"the query embedder failed: {exc}") from exc
            for text, raw in zip(missing, vectors, strict=True):
                vector = unit(raw)
                self._cache.put(text, vector)
                found[text] = vector
        return [found[text] for text in texts]

    @staticmethod
    def _needs_vector(query: Query) -> bool:
        return query.fusion != retrieval_pb2.FUSION_MODE_KEYWORD

    async def _vector_for(self, query: Query) -> Vector | None:
        """The query's vector, or None for a keyword-only search (no model time)."""
        if not self._needs_vector(query):
            return None
        (vector,) = await self.embed([query.text])
        return vector

    async def search(self, query: Query) -> SearchOutcome:
        started = time.perf_counter_ns()
        return await self.search_with(query, await self._vector_for(query), started)

    async def search_many(self, queries: Sequence[Query]) -> list[SearchOutcome]:
        started = time.perf_counter_ns()
        need = [q.text for q in queries if self._needs_vector(q)]
        vectors = dict(zip(need, await self.embed(need), strict=True)) if need else {}
        return [await self.search_with(q, vectors.get(q.text), started) for q in queries]

    async def ranked(self, query: Query, vector: Vector | None) -> list[Fused]:
        """The fused ranking of ``query`` after ``min_score``, before hydration."""
        pool = max(self.candidates, query.top_k)
        dense: list[Hit] = []
        keyword: list[Hit] = []
        keyword_task = None
        if query.fusion == retrieval_pb2.FUSION_MODE_KEYWORD:
            # nothing to overlap with: a hop to a worker thread costs more than it saves
            keyword = self.keyword.search(query.text, query.filter, pool)
        elif query.fusion != retrieval_pb2.FUSION_MODE_DENSE:
            # tantivy releases the GIL: BM25 runs on the other core meanwhile
            keyword_task = asyncio.ensure_future(
                asyncio.to_thread(self.keyword.search, query.text, query.filter, pool)
            )
        try:
            if query.fusion != retrieval_pb2.FUSION_MODE_KEYWORD:
                assert vector is not None
                dense = await self.backend.search(vector, query.filter, pool, at_least=query.top_k)
        finally:
            if keyword_task is not None:
                keyword = await keyword_task
        fused = fuse(
            dense, keyword, query.fusion, rrf_k=self.rrf_k, dense_weight=query.dense_weight
        )
        if query.min_score is not None:
            # compared as the response carries it (a float32), so a client that sends
            # back a score it received keeps that result
            fused = [f for f in fused if float(np.float32(f.score)) >= query.min_score]
        return fused

    async def search_with(
        self, query: Query, vector: Vector | None, started: int | None = None
    ) -> SearchOutcome:
        started = time.perf_counter_ns() if started is None else started
        fused = await self.ranked(query, vector)
        results = await self.hydrate(fused, query.top_k)
        took = (time.perf_counter_ns() - started) // 1000
        return SearchOutcome(results, query.fusion, took)

    async def stream(self, query: Query) -> AsyncIterator[retrieval_pb2.SearchResult]:
        """Results one at a time: the first is hydrated and sent before the rest."""
        fused = await self.ranked(query, await self._vector_for(query))
        first = await self.hydrate(fused, 1)
        if not first:
            return
        yield first[0]
        sent = first[0].chunk.chunk_id
        start = next(i for i, f in enumerate(fused) if f.chunk_id == sent) + 1
        for result in await self.hydrate(fused[start:], query.top_k - 1, first_rank=2):
            yield result

    async def hydrate(
        self, fused: Sequence[Fused], top_k: int, *, first_rank: int = 1
    ) -> list[retrieval_pb2.SearchResult]:
        results: list[retrieval_pb2.SearchResult] = []
        offset = 0
        while len(results) < top_k and offset < len(fused):
            window = fused[offset : offset + top_k - len(results)]
            offset += len(window)
            records = await self.backend.get([f.chunk_id for f in window])
            for item in window:
                record = records.get(item.chunk_id)
                if record is None or self.state.is_dead(record.key):
                    continue  # removed since it was ranked
                result = retrieval_pb2.SearchResult(
                    chunk=record.chunk,
                    score=item.score,
                    rank=first_rank + len(results),
                )
                if item.dense is not None:
                    result.dense_score = item.dense
                if item.keyword is not None:
                    result.keyword_score = item.keyword
                anchor = self.state.anchor(record.key, record.chunk.provenance.sha256)
                if anchor is not None:
                    result.chunk.provenance.anchor.CopyFrom(anchor)
                results.append(result)
        return results

    async def get_chunk(self, chunk_id: str) -> retrieval_pb2.Chunk:
        records = await self.backend.get([chunk_id])
        record = records.get(chunk_id)
        if record is None or self.state.is_dead(record.key):
            raise NotFound(
                f"chunk {chunk_id!r} is not in the index (unknown, or its version was "
                "retired or deleted)",
                resource_type="chunk",
                resource_name=chunk_id,
            )
        chunk = retrieval_pb2.Chunk()
        chunk.CopyFrom(record.chunk)
        anchor = self.state.anchor(record.key, chunk.provenance.sha256)
        if anchor is not None:
            chunk.provenance.anchor.CopyFrom(anchor)
        return chunk

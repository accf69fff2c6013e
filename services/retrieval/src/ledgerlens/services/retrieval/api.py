"""The retrieval gRPC servicer: proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.retrieval.requests import Limits, parse_batch, parse_search
from ledgerlens.services.retrieval.searcher import Searcher, SearchOutcome

__all__ = ["RetrievalApi"]

Context = grpc.aio.ServicerContext[Any, Any]

_MAX_CHUNK_ID_CHARS = 200


def _response(outcome: SearchOutcome) -> retrieval_pb2.SearchResponse:
    return retrieval_pb2.SearchResponse(
        results=outcome.results,
        fusion=retrieval_pb2.FusionMode.ValueType(outcome.fusion),
        took_micros=outcome.took_micros,
    )


class RetrievalApi(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, searcher: Searcher, limits: Limits) -> None:
        self._searcher = searcher
        self._limits = limits

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: Context
    ) -> retrieval_pb2.SearchResponse:
        query = parse_search(request, self._limits)
        return _response(await self._searcher.search(query))

    async def SearchStream(
        self, request: retrieval_pb2.SearchStreamRequest, context: Context
    ) -> AsyncIterator[retrieval_pb2.SearchStreamResponse]:
        query = parse_search(request.search, self._limits)
        async for result in self._searcher.stream(query):
            yield retrieval_pb2.SearchStreamResponse(result=result)

    async def BatchSearch(
        self, request: retrieval_pb2.BatchSearchRequest, context: Context
    ) -> retrieval_pb2.BatchSearchResponse:
        queries = parse_batch(request, self._limits)
        outcomes = await self._searcher.search_many(queries)
        return retrieval_pb2.BatchSearchResponse(responses=[_response(o) for o in outcomes])

    async def GetChunk(
        self, request: retrieval_pb2.GetChunkRequest, context: Context
    ) -> retrieval_pb2.GetChunkResponse:
        chunk_id = request.chunk_id.strip()
        if not chunk_id or len(chunk_id) > _MAX_CHUNK_ID_CHARS:
            raise InvalidArgument(
                f"chunk_id must be 1-{_MAX_CHUNK_ID_CHARS} characters",
                [("chunk_id", "must be 1-200 characters")],
            )
        return retrieval_pb2.GetChunkResponse(chunk=await self._searcher.get_chunk(chunk_id))

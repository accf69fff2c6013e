"""The retrieval service assembled: database, vector backend, keyword index, embedder,
event consumers, ops app, gRPC server.

:func:`run_retrieval` is what ``python -m ledgerlens.services.retrieval`` runs and
what the integration tests start, so both exercise the same wiring.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from google.protobuf.message import Message

from ledgerlens.embedding import Embedder, create_embedder
from ledgerlens.embedding.batching import EmbeddingQueue
from ledgerlens.events.v1 import events_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime import metrics
from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.db import create_engine, database_check
from ledgerlens.runtime.events import CONSUMERS, STREAMS, ConsumerSpec, EventBus, StreamSpec
from ledgerlens.runtime.events.specs import subject_of
from ledgerlens.runtime.ops import build_ops_app, mark_draining, serve_ops_app
from ledgerlens.runtime.server import ServiceServer, build_server
from ledgerlens.services.retrieval.api import RetrievalApi
from ledgerlens.services.retrieval.index import VectorBackend
from ledgerlens.services.retrieval.index.local import LocalBackend
from ledgerlens.services.retrieval.indexer import Indexer, IndexState
from ledgerlens.services.retrieval.keyword import KeywordIndex
from ledgerlens.services.retrieval.migrate import migrate
from ledgerlens.services.retrieval.requests import Limits
from ledgerlens.services.retrieval.searcher import Searcher
from ledgerlens.services.retrieval.settings import Settings
from ledgerlens.services.retrieval.store import Store

__all__ = ["RETRIEVAL_CONSUMERS", "SERVICE", "RunningRetrieval", "create_backend", "run_retrieval"]

SERVICE = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"]
#: the platform's declared consumers of this service (see ledgerlens.runtime.events.specs).
RETRIEVAL_CONSUMERS: tuple[ConsumerSpec, ...] = tuple(
    c for c in CONSUMERS if c.durable.startswith("retrieval--")
)


@dataclass
class RunningRetrieval:
    server: ServiceServer
    app: FastAPI
    searcher: Searcher
    indexer: Indexer
    grpc_address: str
    http_url: str


def create_backend(settings: Settings, store: Store, dimensions: int) -> VectorBackend:
    if settings.backend == "qdrant":
        from ledgerlens.services.retrieval.index.qdrant import QdrantBackend

        return QdrantBackend(settings.qdrant, settings.data_dir, dimensions)
    return LocalBackend(store, settings.data_dir, dimensions, settings.local)


def replica_consumer(
    spec: ConsumerSpec, replica: str, idle_seconds: float | None = None
) -> ConsumerSpec:
    """The consumer of one replica: every replica keeps a whole index, so each reads
    every event through a durable of its own.

    A replica is usually a pod, and a replaced pod never returns to its durables, so
    the server deletes them after ``idle_seconds`` without a pull (None: kept).
    """
    if not replica:
        return spec
    durable = spec.durable.replace("retrieval--", f"retrieval-{replica}--", 1)
    return dataclasses.replace(spec, durable=durable, inactive_threshold_seconds=idle_seconds)


@asynccontextmanager
async def run_retrieval(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    streams: Mapping[str, StreamSpec] = STREAMS,
    consumers: Sequence[ConsumerSpec] = RETRIEVAL_CONSUMERS,
) -> AsyncIterator[RunningRetrieval]:
    """Migrate, open the index, start everything, yield it; on exit drain and stop.

    ``embedder``: one already loaded (kept open); by default one is made from
    ``settings.embedding`` and closed on exit. ``streams`` and ``consumers`` let a test
    run the service in a namespace of its own (``ledgerlens.runtime.testing.EventNames``).
    """
    await migrate(settings.database_url)
    await asyncio.to_thread(Path(settings.data_dir).mkdir, parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        if embedder is None:
            embedder = await create_embedder(settings.embedding)
            stack.push_async_callback(embedder.aclose)
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        store = Store(engine)

        state = IndexState(store)
        await state.load()
        backend = create_backend(settings, store, embedder.dimensions)
        await backend.start()
        stack.push_async_callback(backend.stop)
        keyword = KeywordIndex(settings.data_dir)
        await keyword.start()
        stack.push_async_callback(keyword.stop)
        indexer = Indexer(
            backend, keyword, state, model=embedder.model, dimensions=embedder.dimensions
        )
        await indexer.reconcile()

        queue = EmbeddingQueue(embedder, batch_size=settings.embedding.batch_size)
        queue.start()
        stack.push_async_callback(queue.stop)
        searcher = Searcher(
            backend,
            keyword,
            state,
            queue,
            candidates=settings.candidates,
            rrf_k=settings.rrf_k,
            query_cache_size=settings.query_cache_size,
        )

        # the bus closes (consumers finish their in-flight event) before the index closes
        bus = await EventBus.connect(
            settings.nats_url,
            "retrieval",
            state_interval_seconds=settings.events_state_interval_seconds,
        )
        stack.push_async_callback(bus.close)
        await bus.ensure_stream(streams["INGESTION"])
        await bus.ensure_stream(streams["LEDGER"])
        await bus.ensure_stream(streams["DEADLETTER"])  # what the consumers give up on
        handlers = {
            events_pb2.ChunksEmbedded: indexer.on_chunks,
            events_pb2.DocumentVersionRetired: indexer.on_retired,
            events_pb2.DocumentDeleted: indexer.on_deleted,
            events_pb2.AnchorCommitted: indexer.on_anchor,
        }
        for message_type, handler in handlers.items():
            spec = _consumer_for(consumers, message_type)
            consumer = replica_consumer(
                spec, settings.replica, settings.replica_consumer_idle_seconds
            )
            await bus.subscribe(consumer, message_type, handler)  # type: ignore[arg-type]

        app = build_ops_app(
            "retrieval",
            {"database": database_check(engine), "nats": bus.ready},
            registry=metrics.registry(),
        )
        ops = await serve_ops_app(app, settings.host, settings.http_port)
        stack.push_async_callback(ops.stop)
        http_url = f"http://{settings.host}:{ops.port}"

        limits = Limits(
            max_top_k=settings.max_top_k,
            default_top_k=settings.default_top_k,
            max_query_chars=settings.max_query_chars,
            max_filter_values=settings.max_filter_values,
            max_batch=settings.max_batch,
        )
        server = build_server(
            settings,
            [
                (
                    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server,
                    RetrievalApi(searcher, limits),
                    SERVICE,
                )
            ],
            TokenVerifier.from_settings(settings.auth) if settings.auth.enabled else None,
        )
        await server.start()
        try:
            yield RunningRetrieval(server, app, searcher, indexer, server.address, http_url)
        finally:
            mark_draining(app)
            await server.stop()


def _consumer_for(consumers: Sequence[ConsumerSpec], message_type: type[Message]) -> ConsumerSpec:
    # match on the subject below its root token: tests run under another root
    rest = subject_of(message_type).partition(".")[2]
    for spec in consumers:
        if spec.filter_subject.partition(".")[2] == rest:
            return spec
    raise LookupError(f"no retrieval consumer declared for {message_type.DESCRIPTOR.full_name}")

"""The ingestion service assembled: storage, embedder, event relay and consumer, ops app,
gRPC server.

:func:`run_ingestion` is what ``python -m ledgerlens.services.ingestion`` runs and
what the integration tests start, so both exercise the same wiring. Tests pass an
already loaded ``embedder`` (the model loads once per test session).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from ledgerlens.embedding import Embedder, create_embedder
from ledgerlens.embedding.batching import EmbeddingQueue
from ledgerlens.events.v1 import events_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc
from ledgerlens.runtime import metrics
from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.db import create_engine, database_check
from ledgerlens.runtime.events import (
    CONSUMERS,
    STREAMS,
    ConsumerSpec,
    EventBus,
    StreamSpec,
    Subjects,
)
from ledgerlens.runtime.ops import build_ops_app, mark_draining, serve_ops_app
from ledgerlens.runtime.outbox import OutboxRelay
from ledgerlens.runtime.server import ServiceServer, build_server
from ledgerlens.services.ingestion.api import IngestionApi
from ledgerlens.services.ingestion.events import AnchorHandler, same_subject
from ledgerlens.services.ingestion.ingest import IngestLimits, Ingestor
from ledgerlens.services.ingestion.migrate import migrate
from ledgerlens.services.ingestion.schema import OUTBOX
from ledgerlens.services.ingestion.settings import Settings
from ledgerlens.services.ingestion.store import Store

__all__ = ["ANCHOR_CONSUMER", "SERVICE", "RunningIngestion", "run_ingestion"]

SERVICE = ingestion_pb2.DESCRIPTOR.services_by_name["IngestionService"]
ANCHOR_CONSUMER = next(c for c in CONSUMERS if c.filter_subject == Subjects.LEDGER_ANCHOR_COMMITTED)


@dataclass
class RunningIngestion:
    server: ServiceServer
    app: FastAPI
    ingestor: Ingestor
    grpc_address: str
    http_url: str


@asynccontextmanager
async def run_ingestion(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    streams: Mapping[str, StreamSpec] = STREAMS,
    anchor_consumer: ConsumerSpec = ANCHOR_CONSUMER,
    subject: Callable[[str], str] = same_subject,
) -> AsyncIterator[RunningIngestion]:
    """Migrate, start everything, yield it; on exit drain and stop in reverse order.

    ``embedder``: one already loaded (kept open); by default one is made from
    ``settings.embedding`` and closed on exit. ``streams``, ``anchor_consumer`` and
    ``subject`` let a test run the service in a namespace of its own
    (``ledgerlens.runtime.testing.EventNames``).
    """
    await migrate(settings.database_url)
    async with AsyncExitStack() as stack:
        if embedder is None:
            embedder = await create_embedder(settings.embedding)
            stack.push_async_callback(embedder.aclose)
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)

        bus = await EventBus.connect(
            settings.nats_url,
            "ingestion",
            state_interval_seconds=settings.events_state_interval_seconds,
        )
        stack.push_async_callback(bus.close)
        await bus.ensure_stream(streams["INGESTION"])
        relay = OutboxRelay(
            bus, engine, table=OUTBOX, keep_published=settings.outbox_keep_published_seconds
        )
        relay.start()
        stack.push_async_callback(relay.stop)

        store = Store(engine, relay)
        queue = EmbeddingQueue(embedder, batch_size=settings.embedding.batch_size)
        queue.start()
        stack.push_async_callback(queue.stop)
        ingestor = Ingestor(
            store,
            embedder,
            queue,
            IngestLimits(
                max_document_bytes=settings.max_document_bytes,
                chunk_max_tokens=settings.chunk_max_tokens,
                chunk_overlap_tokens=settings.chunk_overlap_tokens,
                event_max_chunks=settings.event_max_chunks,
                event_max_bytes=settings.event_max_bytes,
            ),
            subject=subject,
        )

        await bus.ensure_stream(streams["LEDGER"])  # declared by whoever starts first
        await bus.ensure_stream(streams["DEADLETTER"])  # what the consumer gives up on
        await bus.subscribe(anchor_consumer, events_pb2.AnchorCommitted, AnchorHandler(store))

        app = build_ops_app(
            "ingestion",
            {"database": database_check(engine), "nats": bus.ready},
            registry=metrics.registry(),
        )
        ops = await serve_ops_app(app, settings.host, settings.http_port)
        stack.push_async_callback(ops.stop)
        http_url = f"http://{settings.host}:{ops.port}"

        server = build_server(
            settings,
            [
                (
                    ingestion_pb2_grpc.add_IngestionServiceServicer_to_server,
                    IngestionApi(ingestor, stream_concurrency=settings.stream_concurrency),
                    SERVICE,
                )
            ],
            TokenVerifier.from_settings(settings.auth) if settings.auth.enabled else None,
        )
        await server.start()
        try:
            yield RunningIngestion(server, app, ingestor, server.address, http_url)
        finally:
            mark_draining(app)
            await server.stop()

"""The ledger service assembled: database, backend, event follower, outbox relay,
consumers, ops app, gRPC server.

:func:`run_ledger` is what ``python -m ledgerlens.services.ledger`` runs and what the
tests, the CLI's tests and ``bench/ledger_anchors.py`` start, so all of them exercise
the same wiring.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from google.protobuf.message import Message

from ledgerlens.events.v1 import events_pb2
from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledgerlens.runtime import metrics
from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.db import create_engine, database_check
from ledgerlens.runtime.events import (
    CONSUMERS,
    STREAMS,
    ConsumerSpec,
    EventBus,
    StreamSpec,
    Subscription,
    subject_of,
)
from ledgerlens.runtime.ops import build_ops_app, mark_draining, serve_ops_app
from ledgerlens.runtime.outbox import OutboxRelay
from ledgerlens.runtime.server import ServiceServer, build_server
from ledgerlens.services.ledger.anchoring import Anchoring
from ledgerlens.services.ledger.api import LedgerApi
from ledgerlens.services.ledger.backend import LedgerBackend, create_backend
from ledgerlens.services.ledger.events import AnchorBatcher, AuditHandler, DocumentHandler
from ledgerlens.services.ledger.follower import EventFollower
from ledgerlens.services.ledger.metrics import MeteredBackend
from ledgerlens.services.ledger.migrate import migrate
from ledgerlens.services.ledger.schema import OUTBOX
from ledgerlens.services.ledger.settings import Settings

__all__ = ["LEDGER_CONSUMERS", "SERVICE", "RunningLedger", "run_ledger"]

SERVICE = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"]
#: the platform's declared consumers of this service (see ledgerlens.runtime.events.specs).
LEDGER_CONSUMERS: tuple[ConsumerSpec, ...] = tuple(
    c for c in CONSUMERS if c.durable.startswith("ledger--")
)


@dataclass
class RunningLedger:
    server: ServiceServer
    app: FastAPI
    backend: LedgerBackend
    anchoring: Anchoring
    follower: EventFollower
    relay: OutboxRelay
    grpc_address: str
    http_url: str


def _consumer_for(consumers: Sequence[ConsumerSpec], message_type: type[Message]) -> ConsumerSpec:
    # match on the subject below its root token: tests run under another root
    rest = subject_of(message_type).partition(".")[2]
    for spec in consumers:
        if spec.filter_subject.partition(".")[2] == rest:
            return spec
    raise LookupError(f"no ledger consumer declared for {message_type.DESCRIPTOR.full_name}")


def _publish_subject(streams: Mapping[str, StreamSpec]) -> Callable[[str], str]:
    """Maps a platform subject into the root of the LEDGER stream given (the platform's
    ``ledgerlens`` normally, a test's own root under test)."""
    root = streams["LEDGER"].subjects[0].partition(".")[0]

    def subject(platform_subject: str) -> str:
        return f"{root}.{platform_subject.partition('.')[2]}"

    return subject


@asynccontextmanager
async def run_ledger(
    settings: Settings,
    *,
    streams: Mapping[str, StreamSpec] = STREAMS,
    consumers: Sequence[ConsumerSpec] = LEDGER_CONSUMERS,
) -> AsyncIterator[RunningLedger]:
    """Migrate, start everything, yield it; on exit drain and stop in reverse order.

    ``streams`` and ``consumers`` let a test run the service in a namespace of its own
    (``ledgerlens.runtime.testing.EventNames``); published subjects follow the root of
    ``streams["LEDGER"]``.
    """
    await migrate(settings.database_url)
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        backend: LedgerBackend = MeteredBackend(await create_backend(settings, engine))
        stack.push_async_callback(backend.close)
        anchoring = Anchoring(backend, settings.chaincode)

        bus = await EventBus.connect(
            settings.nats_url,
            "ledger",
            state_interval_seconds=settings.events_state_interval_seconds,
        )
        stack.push_async_callback(bus.close)
        # declared by whoever starts first; DEADLETTER keeps what the consumers give up on
        for name in ("LEDGER", "INGESTION", "INFERENCE", "DEADLETTER"):
            await bus.ensure_stream(streams[name])
        relay = OutboxRelay(
            bus, engine, table=OUTBOX, keep_published=settings.outbox_keep_published_seconds
        )
        relay.start()
        stack.push_async_callback(relay.stop)

        follower = EventFollower(
            backend,
            engine,
            relay,
            chaincode=settings.chaincode,
            subject=_publish_subject(streams),
            start_block=settings.follow_from_block,
        )
        follower.start()
        stack.push_async_callback(follower.stop)

        batcher = AnchorBatcher(
            anchoring,
            max_batch=settings.anchor_batch_size,
            linger=settings.anchor_batch_linger_seconds,
        )
        batcher.start()
        stack.push_async_callback(batcher.stop)
        documents = dataclasses.replace(
            _consumer_for(consumers, events_pb2.DocumentIngested), batch=1
        )
        handler = DocumentHandler(batcher)
        subscriptions: list[Subscription[Any]] = [
            await bus.subscribe(documents, events_pb2.DocumentIngested, handler)
            for _ in range(settings.anchor_consumer_concurrency)
        ]
        subscriptions.append(
            await bus.subscribe(
                _consumer_for(consumers, events_pb2.CompletionRecorded),
                events_pb2.CompletionRecorded,
                AuditHandler(anchoring),
            )
        )

        async def stop_consumers() -> None:
            # before the batcher: handlers waiting for their batch finish and ack
            await asyncio.gather(*(s.stop(settings.shutdown_grace_seconds) for s in subscriptions))

        stack.push_async_callback(stop_consumers)

        app = build_ops_app(
            "ledger",
            {
                "database": database_check(engine),
                "nats": bus.ready,
                "ledger": backend.ready,
                "follower": follower.ready,
            },
            registry=metrics.registry(),
        )
        ops = await serve_ops_app(app, settings.host, settings.http_port)
        stack.push_async_callback(ops.stop)
        http_url = f"http://{settings.host}:{ops.port}"

        server = build_server(
            settings,
            [
                (
                    ledger_pb2_grpc.add_LedgerServiceServicer_to_server,
                    LedgerApi(backend, anchoring, settings.chaincode),
                    SERVICE,
                )
            ],
            TokenVerifier.from_settings(settings.auth) if settings.auth.enabled else None,
        )
        await server.start()
        try:
            yield RunningLedger(
                server, app, backend, anchoring, follower, relay, server.address, http_url
            )
        finally:
            mark_draining(app)
            await server.stop()

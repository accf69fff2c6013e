"""The inference service assembled: database and outbox, providers and router, limits,
idempotency, caches, moderation, retrieval for answers, the consumer of key
revocations, the ops app and the gRPC server.

:func:`run_inference` is what ``python -m ledgerlens.services.inference`` runs and what
the integration tests start, so both exercise the same wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.embedding import Embedder
from ledgerlens.events.v1 import events_pb2
from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.runtime import metrics
from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.clients import retrieval_client, service_token_provider
from ledgerlens.runtime.db import create_engine, database_check
from ledgerlens.runtime.events import CONSUMERS, STREAMS, ConsumerSpec, EventBus, StreamSpec
from ledgerlens.runtime.events.specs import Subjects
from ledgerlens.runtime.ops import build_ops_app, mark_draining, serve_ops_app
from ledgerlens.runtime.outbox import OutboxRelay
from ledgerlens.runtime.server import ServiceServer, build_server
from ledgerlens.services.inference.accounting import Accountant
from ledgerlens.services.inference.api import InferenceApi
from ledgerlens.services.inference.cache import build_cache
from ledgerlens.services.inference.events import RevocationHandler, same_subject
from ledgerlens.services.inference.gateway import Gateway
from ledgerlens.services.inference.idempotency import build_idempotency
from ledgerlens.services.inference.limits import build_limiter
from ledgerlens.services.inference.migrate import migrate
from ledgerlens.services.inference.moderation import build_moderator
from ledgerlens.services.inference.providers import ModelPrice, ProviderConfig, build_providers
from ledgerlens.services.inference.rag import Rag, retrieval_search
from ledgerlens.services.inference.revocations import Revocations
from ledgerlens.services.inference.router import Router
from ledgerlens.services.inference.schema import OUTBOX
from ledgerlens.services.inference.settings import Settings
from ledgerlens.services.inference.store import UsageStore
from ledgerlens.services.inference.tokens import default_counter

__all__ = ["REVOKED_CONSUMER", "SERVICE", "RunningInference", "prices_of", "run_inference"]

_log = logging.getLogger(__name__)

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
#: the platform's consumer of ``identity.key.revoked`` for inference
REVOKED_CONSUMER = next(
    c
    for c in CONSUMERS
    if c.durable.startswith("inference--") and c.filter_subject == Subjects.IDENTITY_KEY_REVOKED
)


@dataclass
class RunningInference:
    server: ServiceServer
    app: FastAPI
    gateway: Gateway
    relay: OutboxRelay
    revocations: Revocations
    grpc_address: str
    http_url: str


def prices_of(providers: list[ProviderConfig]) -> dict[tuple[str, str], ModelPrice]:
    """(provider, model) -> its price as configured (integer micro-USD per 1k tokens)."""
    return {(p.name, model): price for p in providers for model, price in p.prices.items()}


def _relay_engine(engine: AsyncEngine, url: str) -> AsyncEngine:
    """The relay's engine. On SQLite its own, whose commits skip the fsync
    (``synchronous=NORMAL``): a relay commit only marks rows published, and losing that
    mark to a power cut republishes them under the same ``Nats-Msg-Id`` (dropped by
    JetStream as duplicates). Each fsync held the database's one write lock, and the
    accounting writer, whose commits a reply waits for, slept in SQLite's busy handler
    behind it. The next accounting commit (``synchronous=FULL``) syncs the shared WAL,
    the relay's pages included."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return engine
    relay_engine = create_engine(url)
    event.listen(relay_engine.sync_engine, "connect", _no_fsync_on_commit)
    return relay_engine


def _no_fsync_on_commit(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@asynccontextmanager
async def run_inference(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    streams: Mapping[str, StreamSpec] = STREAMS,
    revoked_consumer: ConsumerSpec = REVOKED_CONSUMER,
    subject: Callable[[str], str] = same_subject,
) -> AsyncIterator[RunningInference]:
    """Migrate, start everything, yield it; on exit drain and stop in reverse order.

    ``embedder``: a loaded one for the local provider's embeddings (kept open); by
    default it is loaded on the first Embed. ``streams``, ``revoked_consumer`` and
    ``subject`` let a test run the service in a namespace of its own
    (``ledgerlens.runtime.testing.EventNames``).
    """
    await migrate(settings.database_url)
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        store = UsageStore(engine)
        stack.push_async_callback(store.aclose)

        bus = await EventBus.connect(
            settings.nats_url,
            "inference",
            state_interval_seconds=settings.events_state_interval_seconds,
        )
        stack.push_async_callback(bus.close)
        await bus.ensure_stream(streams["INFERENCE"])
        await bus.ensure_stream(streams["DEADLETTER"])  # what the consumer gives up on
        relay_engine = _relay_engine(engine, settings.database_url)
        if relay_engine is not engine:
            stack.push_async_callback(relay_engine.dispose)
        relay = OutboxRelay(
            bus,
            relay_engine,
            table=OUTBOX,
            poll_interval=settings.outbox_poll_seconds,
            keep_published=settings.outbox_keep_published_seconds,
        )
        relay.start()
        stack.push_async_callback(relay.stop)
        accountant = Accountant(store, relay=relay, subject=subject)
        revocations = Revocations(store, refresh_seconds=settings.revocation_refresh_seconds)
        await revocations.load()
        refresh = asyncio.create_task(revocations.refresh_forever(), name="revocations-refresh")
        stack.push_async_callback(_cancel, refresh)

        providers = build_providers(settings.providers, embedder=embedder)
        router = Router(providers, settings.router)
        stack.push_async_callback(router.aclose)
        moderator = build_moderator(settings.moderation)
        close_moderator = getattr(moderator, "aclose", None)
        if close_moderator is not None:
            stack.push_async_callback(close_moderator)
        limiter = build_limiter(settings.limits)
        stack.push_async_callback(limiter.aclose)
        idempotency = build_idempotency(settings.idempotency)
        stack.push_async_callback(idempotency.aclose)
        cache = build_cache(settings.cache)
        stack.push_async_callback(cache.aclose)

        # retrieval with the service's own token: the caller needs inference:invoke only
        retrieval = retrieval_client(
            settings.rag.retrieval_target,
            token_provider=service_token_provider(settings),
            default_timeout=settings.rag.retrieval_timeout_seconds,
        )
        stack.push_async_callback(retrieval.close)
        rag = Rag(
            retrieval_search(retrieval, default_timeout=settings.rag.retrieval_timeout_seconds),
            default_counter().count,
            prompt_token_budget=settings.rag.prompt_token_budget,
        )
        gateway = Gateway(
            router=router,
            moderator=moderator,
            limiter=limiter,
            idempotency=idempotency,
            cache=cache,
            accountant=accountant,
            prices=prices_of(settings.providers),
            rag=rag,
            revocations=revocations,
        )

        await bus.ensure_stream(streams["IDENTITY"])  # declared by whoever starts first
        await bus.subscribe(
            revoked_consumer, events_pb2.ApiKeyRevoked, RevocationHandler(revocations)
        )

        app = build_ops_app(
            "inference",
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
                    inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                    InferenceApi(gateway),
                    SERVICE,
                )
            ],
            TokenVerifier.from_settings(settings.auth) if settings.auth.enabled else None,
        )
        await server.start()
        try:
            yield RunningInference(
                server, app, gateway, relay, revocations, server.address, http_url
            )
        finally:
            mark_draining(app)
            await server.stop()

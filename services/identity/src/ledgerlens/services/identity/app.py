"""The identity service assembled: storage, domain, event relay, ops app, gRPC server.

:func:`run_identity` is what ``python -m ledgerlens.services.identity`` runs and what
the integration tests start, so both exercise the same wiring.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime import metrics
from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.db import create_engine, database_check, session_factory
from ledgerlens.runtime.events import STREAMS, EventBus, StreamSpec
from ledgerlens.runtime.ops import build_ops_app, mark_draining, serve_ops_app
from ledgerlens.runtime.outbox import OutboxRelay
from ledgerlens.runtime.server import ServiceServer, build_server
from ledgerlens.services.identity.api import IdentityApi
from ledgerlens.services.identity.ca import CertificateAuthority
from ledgerlens.services.identity.ca_store import CaStore
from ledgerlens.services.identity.fabric_ca import build_fabric_ca_router
from ledgerlens.services.identity.migrate import migrate
from ledgerlens.services.identity.rest import build_rest_router
from ledgerlens.services.identity.schema import OUTBOX
from ledgerlens.services.identity.service import IdentityCore
from ledgerlens.services.identity.settings import Settings

__all__ = ["SERVICE", "RunningIdentity", "run_identity"]

SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


@dataclass
class RunningIdentity:
    server: ServiceServer
    app: FastAPI
    core: IdentityCore
    ca: CertificateAuthority
    grpc_address: str
    http_url: str


@asynccontextmanager
async def run_identity(
    settings: Settings, *, stream: StreamSpec = STREAMS["IDENTITY"]
) -> AsyncIterator[RunningIdentity]:
    """Migrate, start everything, yield it; on exit drain and stop in reverse order."""
    await migrate(settings.database_url)
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        core = IdentityCore(settings, engine)
        stack.push_async_callback(core.close)
        await core.start()
        ca = CertificateAuthority.from_settings(settings, CaStore(session_factory(engine)))

        bus = await EventBus.connect(
            settings.nats_url,
            "identity",
            state_interval_seconds=settings.events_state_interval_seconds,
        )
        stack.push_async_callback(bus.close)
        await bus.ensure_stream(stream)
        relay = OutboxRelay(
            bus, engine, table=OUTBOX, keep_published=settings.outbox_keep_published_seconds
        )
        relay.start()
        stack.push_async_callback(relay.stop)

        app = build_ops_app(
            "identity",
            {"database": database_check(engine), "nats": bus.ready},
            registry=metrics.registry(),
            extra_routers=[build_rest_router(core), build_fabric_ca_router(ca)],
        )
        ops = await serve_ops_app(app, settings.host, settings.http_port)
        stack.push_async_callback(ops.stop)
        http_url = f"http://{settings.host}:{ops.port}"

        auth = settings.auth
        if auth.enabled and auth.jwks_url is None and auth.static_jwks is None:
            # identity verifies its own tokens the way every service does: from its JWKS
            auth = auth.model_copy(update={"jwks_url": f"{http_url}/.well-known/jwks.json"})
        server = build_server(
            settings,
            [
                (
                    identity_pb2_grpc.add_IdentityServiceServicer_to_server,
                    IdentityApi(core, ca),
                    SERVICE,
                )
            ],
            TokenVerifier.from_settings(auth) if auth.enabled else None,
        )
        await server.start()
        try:
            yield RunningIdentity(server, app, core, ca, server.address, http_url)
        finally:
            mark_draining(app)
            await server.stop()

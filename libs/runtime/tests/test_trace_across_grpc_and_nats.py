"""One trace from a client, through a gRPC call, into a NATS event and its consumer."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc.aio
import pytest
from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer, TokenVerifier
from ledgerlens.runtime.clients import connect, static_token
from ledgerlens.runtime.events import ConsumerSpec, EventBus, EventContext
from ledgerlens.runtime.metrics import RpcMetrics
from ledgerlens.runtime.server import build_server
from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.runtime.testing import EventNames

pytestmark = pytest.mark.integration

EVENT = "ledgerlens.identity.key.revoked.v1"
SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


class _PublishingIdentity(identity_pb2_grpc.IdentityServiceServicer):
    """Introspect publishes an event, as a service's handler would after its write."""

    def __init__(self, bus: EventBus, subject: str) -> None:
        self.bus = bus
        self.subject = subject

    async def Introspect(
        self, request: identity_pb2.IntrospectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.IntrospectResponse:
        event = struct_pb2.Struct()
        event.update({"token": request.token})
        await self.bus.publish(self.subject, event, msg_id=f"introspected-{request.token}")
        return identity_pb2.IntrospectResponse(active=True)


async def test_client_trace_reaches_the_server_and_the_event_consumer(
    event_bus: EventBus, event_names: EventNames, span_exporter: InMemorySpanExporter
) -> None:
    streams = event_names.platform_streams()
    await event_bus.ensure_stream(streams["IDENTITY"])
    subject = event_names.subject(EVENT)
    consumed: asyncio.Future[trace.SpanContext] = asyncio.get_running_loop().create_future()

    async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
        consumed.set_result(trace.get_current_span().get_span_context())

    consumer = ConsumerSpec(
        stream="IDENTITY", durable="trace-test", filter_subject=EVENT, fetch_timeout_seconds=0.5
    )
    await event_bus.subscribe(event_names.consumer(consumer), struct_pb2.Struct, handler)

    issuer = DevTokenIssuer()
    verifier = TokenVerifier(issuer=issuer.issuer, audience="ledgerlens", static_jwks=issuer.jwks())
    server = build_server(
        ServiceSettings(grpc_port=0, shutdown_grace_seconds=1),
        [
            (
                identity_pb2_grpc.add_IdentityServiceServicer_to_server,
                _PublishingIdentity(event_bus, subject),  # type: ignore[abstract]
                SERVICE,
            )
        ],
        verifier,
        metrics=RpcMetrics(CollectorRegistry()),
    )
    await server.start()
    token = issuer.issue("alice", ["tokens:introspect"], tenant="acme")
    try:
        async with connect(
            identity_pb2_grpc.IdentityServiceStub,
            server.address,
            token_provider=static_token(token),
        ) as client:
            with trace.get_tracer("test-client").start_as_current_span("user action") as root:
                response = await client.stub.Introspect(identity_pb2.IntrospectRequest(token="t1"))
        assert response.active
        consumer_ctx = await asyncio.wait_for(consumed, timeout=10)
    finally:
        await server.stop(0)

    trace_id = root.get_span_context().trace_id
    assert consumer_ctx.trace_id == trace_id
    spans = [s for s in span_exporter.get_finished_spans() if s.context.trace_id == trace_id]
    names = {s.name for s in spans}
    assert f"/{SERVICE.full_name}/Introspect" in names  # the server span
    assert f"{subject} publish" in names  # published from inside the call
    assert f"{subject} process" in names  # the consumer's span
    server_span = next(s for s in spans if s.name == f"/{SERVICE.full_name}/Introspect")
    publish_span = next(s for s in spans if s.name == f"{subject} publish")
    assert publish_span.parent is not None
    assert publish_span.parent.span_id == server_span.context.span_id

"""The runtime's gRPC server over real loopback sockets, serving the identity contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    from_rpc_error,
)
from ledgerlens.runtime.metrics import RpcMetrics
from ledgerlens.runtime.ops import build_ops_app, serve_ops_app
from ledgerlens.runtime.server import ServiceServer
from ledgerlens.runtime.telemetry import inject_trace_metadata

pytestmark = pytest.mark.integration

Metadata = Callable[..., tuple[tuple[str, str], ...]]
SERVICE = "ledgerlens.identity.v1.IdentityService"


async def _call(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub,
    request: identity_pb2.CreateApiKeyRequest,
    metadata: tuple[tuple[str, str], ...],
) -> identity_pb2.CreateApiKeyResponse:
    return await stub.CreateApiKey(request, metadata=metadata, timeout=10)


async def _until_in_flight(server: ServiceServer) -> None:
    """Wait until the server is serving a (non-health) call."""
    async with asyncio.timeout(5):
        while server.interceptor.inflight == 0:  # noqa: ASYNC110  (polling a counter)
            await asyncio.sleep(0.01)


async def test_health_reports_serving_overall_and_per_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_service_without_a_token(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for reply in stub.ServerReflectionInfo(requests(), timeout=5):
        names = [s.name for s in reply.list_services_response.service]
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


async def test_authorised_call_reaches_the_servicer_with_the_principal(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata
) -> None:
    reply = await stub.CreateApiKey(
        identity_pb2.CreateApiKeyRequest(name="ci", scopes=["search:read"]),
        metadata=auth_md(tenant="acme"),
        timeout=5,
    )
    assert reply.key.name == "ci"
    assert reply.key.tenant_id == "acme"  # from the token, via current_principal()


async def test_invalid_argument_arrives_with_field_violations(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name=""), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "the key needs a name"
    domain = from_rpc_error(err.value)
    assert isinstance(domain, InvalidArgument)
    assert domain.violations == [("name", "must be 1-100 characters")]
    assert domain.reason == "INVALID_ARGUMENT"


async def test_already_exists_and_retry_info_details(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="dup"), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    dup = from_rpc_error(err.value)
    assert isinstance(dup, AlreadyExists)
    assert dup.metadata == {"name": "dup"}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="busy"), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    busy = from_rpc_error(err.value)
    assert isinstance(busy, ResourceExhausted)
    assert busy.retry_after == pytest.approx(2.5)


async def test_unexpected_exception_is_a_generic_internal_error(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub,
    auth_md: Metadata,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="boom"), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert "hunter2" not in str(err.value.trailing_metadata())
    assert from_rpc_error(err.value) is None
    # ...while the traceback is in the server's log
    logged = [r for r in caplog.records if r.exc_info and "hunter2" in str(r.exc_info[1])]
    assert logged, "the unexpected exception should be logged with its traceback"


async def test_metrics_count_the_call_by_service_method_and_code(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata, metrics: RpcMetrics
) -> None:
    await stub.CreateApiKey(identity_pb2.CreateApiKeyRequest(name="a"), metadata=auth_md())
    await stub.CreateApiKey(identity_pb2.CreateApiKeyRequest(name="b"), metadata=auth_md())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateApiKey(identity_pb2.CreateApiKeyRequest(name="dup"), metadata=auth_md())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.CreateApiKey(identity_pb2.CreateApiKeyRequest(name="c"))  # no token

    # scraped over HTTP from the ops app, as Prometheus would
    ops = await serve_ops_app(
        build_ops_app("identity-test", registry=metrics.registry), "127.0.0.1", 0
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ops.port}") as http:
            scrape = await http.get("/metrics")
    finally:
        await ops.stop()
    assert scrape.status_code == 200
    exposition = scrape.text
    counts = {}
    buckets = 0
    for family in text_string_to_metric_families(exposition):
        if family.name != "ledgerlens_rpc_server_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                key = (sample.labels["service"], sample.labels["method"], sample.labels["code"])
                counts[key] = sample.value
            if sample.name.endswith("_bucket"):
                buckets += 1
    assert counts[(SERVICE, "CreateApiKey", "OK")] == 2
    assert counts[(SERVICE, "CreateApiKey", "ALREADY_EXISTS")] == 1
    assert counts[(SERVICE, "CreateApiKey", "UNAUTHENTICATED")] == 1
    assert buckets > 10  # a real histogram, p95 can be computed from it


async def test_a_client_trace_continues_in_the_server_span(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub,
    auth_md: Metadata,
    span_exporter: InMemorySpanExporter,
) -> None:
    tracer = trace.get_tracer("test-client")
    with tracer.start_as_current_span("client-call") as client_span:
        await stub.Introspect(
            identity_pb2.IntrospectRequest(),
            metadata=(*auth_md(["tokens:introspect"]), *inject_trace_metadata()),
            timeout=5,
        )
    client_ctx = client_span.get_span_context()
    server_spans = [
        s
        for s in span_exporter.get_finished_spans()
        if s.name == f"/{SERVICE}/Introspect" and s.context.trace_id == client_ctx.trace_id
    ]
    assert len(server_spans) == 1
    span = server_spans[0]
    assert span.parent is not None
    assert span.parent.span_id == client_ctx.span_id
    assert span.kind == trace.SpanKind.SERVER
    assert span.attributes is not None
    assert span.attributes["rpc.method"] == "Introspect"


async def test_shutdown_reports_not_serving_drains_and_refuses_new_calls(
    server: ServiceServer,
    stub: identity_pb2_grpc.IdentityServiceAsyncStub,
    channel: grpc.aio.Channel,
    servicer: object,
    auth_md: Metadata,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    slow = asyncio.ensure_future(
        _call(stub, identity_pb2.CreateApiKeyRequest(name="slow:1.0"), auth_md())
    )
    await _until_in_flight(server)
    stopping = asyncio.ensure_future(server.stop(grace=5))
    await asyncio.sleep(0.1)

    for name in ("", SERVICE):  # probes still get an answer: NOT_SERVING
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="late"), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not stopping.done()

    reply = await slow  # the in-flight call finishes normally
    assert reply.key.name == "slow:1.0"
    await asyncio.wait_for(stopping, 5)
    assert servicer.completed == ["slow:1.0"]  # type: ignore[attr-defined]


async def test_shutdown_cancels_calls_that_outlive_the_grace(
    server: ServiceServer, stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata
) -> None:
    slow = asyncio.ensure_future(
        _call(stub, identity_pb2.CreateApiKeyRequest(name="slow:30"), auth_md())
    )
    await _until_in_flight(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.stop(grace=0.3)
    assert loop.time() - started < 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await slow
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_deadline_exceeded_round_trips(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="late"), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.value.details() == "every provider was slower than the deadline"
    assert isinstance(from_rpc_error(err.value), DeadlineExceeded)


async def test_violations_name_three_in_the_message_and_carry_all(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, auth_md: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="many"), metadata=auth_md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "invalid key: scopes[0]: unknown scope; scopes[1]: unknown scope; "
        "scopes[2]: unknown scope (and 2 more)"
    )
    domain = from_rpc_error(err.value)
    assert isinstance(domain, InvalidArgument)
    assert [f for f, _ in domain.violations] == [f"scopes[{i}]" for i in range(5)]

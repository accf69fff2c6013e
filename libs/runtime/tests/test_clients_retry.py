"""Service clients over real sockets, against the standard grpc.health.v1 service.

Covers: retries on UNAVAILABLE until the server comes up, bounded attempts and the
deadline when it never does, no retry of other codes or of streams, the default
deadline, and the authorization + traceparent metadata arriving at the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from ledgerlens.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from ledgerlens.runtime.clients import RetryPolicy, connect, retrieval_client, static_token
from ledgerlens.runtime.net import free_port

pytestmark = pytest.mark.integration

HealthStub = health_pb2_grpc.HealthStub


class Recorder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Records each call's method and metadata as the server receives it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.delay = delay

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        metadata = {key: str(value) for key, value in handler_call_details.invocation_metadata}
        self.calls.append((handler_call_details.method, metadata))
        if self.delay:
            await asyncio.sleep(self.delay)
        return await continuation(handler_call_details)


class AttemptCounter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Runs inside the client's interceptors, so it sees every attempt."""

    def __init__(self) -> None:
        self.unary = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.unary += 1
        return await continuation(details, request)


class StreamCounter(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.stream = 0

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.stream += 1
        return await continuation(details, request)


async def _start_health_server(port: int, recorder: Recorder | None = None) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[recorder] if recorder else None)
    # grpc_health exposes `aio` behind a version check mypy does not evaluate
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


@pytest.fixture
async def servers() -> AsyncIterator[list[grpc.aio.Server]]:
    started: list[grpc.aio.Server] = []
    yield started
    for server in started:
        await server.stop(None)


async def test_unary_call_succeeds_once_the_server_comes_up(
    servers: list[grpc.aio.Server],
) -> None:
    port = free_port()
    recorder = Recorder()
    counter = AttemptCounter()

    async def start_later() -> None:
        await asyncio.sleep(0.6)
        servers.append(await _start_health_server(port, recorder))

    starter = asyncio.create_task(start_later())
    retry = RetryPolicy(max_attempts=40, initial_backoff=0.05, max_backoff=0.2)
    async with connect(
        HealthStub, f"127.0.0.1:{port}", default_timeout=8, retry=retry, interceptors=[counter]
    ) as client:
        started = time.monotonic()
        response = await client.stub.Check(health_pb2.HealthCheckRequest())
        elapsed = time.monotonic() - started
    await starter

    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert elapsed >= 0.5  # it did wait for the server...
    assert counter.unary >= 2  # ...by retrying,
    assert len(recorder.calls) == 1  # and only the successful attempt reached it


async def test_a_server_that_never_comes_up_fails_unavailable_after_bounded_attempts() -> None:
    counter = AttemptCounter()
    retry = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=0.1)
    async with connect(
        HealthStub, f"127.0.0.1:{free_port()}", default_timeout=5, retry=retry,
        interceptors=[counter],
    ) as client:  # fmt: skip
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await client.stub.Check(health_pb2.HealthCheckRequest())
        elapsed = time.monotonic() - started

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert counter.unary == 4
    assert elapsed < 2.0


async def test_retries_never_run_past_the_deadline() -> None:
    counter = AttemptCounter()
    retry = RetryPolicy(max_attempts=1000, initial_backoff=0.1, max_backoff=0.4)
    async with connect(
        HealthStub, f"127.0.0.1:{free_port()}", default_timeout=1.0, retry=retry,
        interceptors=[counter],
    ) as client:  # fmt: skip
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await client.stub.Check(health_pb2.HealthCheckRequest())
        elapsed = time.monotonic() - started

    # the last attempt may hit the deadline while the channel is still dialling
    assert failure.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert 1 < counter.unary < 1000
    assert elapsed < 1.25


async def test_other_errors_are_not_retried(servers: list[grpc.aio.Server]) -> None:
    port = free_port()
    recorder = Recorder()
    servers.append(await _start_health_server(port, recorder))
    counter = AttemptCounter()

    async with connect(HealthStub, f"127.0.0.1:{port}", interceptors=[counter]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await client.stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))

    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert counter.unary == 1
    assert len(recorder.calls) == 1


async def test_streaming_calls_are_not_retried() -> None:
    counter = StreamCounter()
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.02)
    async with connect(
        HealthStub, f"127.0.0.1:{free_port()}", retry=retry, interceptors=[counter]
    ) as client:
        stream = client.stub.Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in stream:
                pass

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert counter.stream == 1


async def test_token_and_trace_context_reach_the_server(servers: list[grpc.aio.Server]) -> None:
    port = free_port()
    recorder = Recorder()
    servers.append(await _start_health_server(port, recorder))

    async def token() -> str:
        return "service-token-123"

    tracer = TracerProvider().get_tracer("test_clients_retry")
    async with connect(HealthStub, f"127.0.0.1:{port}", token_provider=token) as client:
        with tracer.start_as_current_span("caller") as span:
            await client.stub.Check(health_pb2.HealthCheckRequest())
            # a caller's own token (forwarded on its behalf) wins over the provider's
            await client.stub.Check(
                health_pb2.HealthCheckRequest(),
                metadata=(("authorization", "Bearer caller-token"),),
            )
        trace_id = format(span.get_span_context().trace_id, "032x")

    (method, first), (_, second) = recorder.calls
    assert method == "/grpc.health.v1.Health/Check"
    assert first["authorization"] == "Bearer service-token-123"
    assert first["traceparent"].split("-")[1] == trace_id
    assert second["authorization"] == "Bearer caller-token"
    assert second["traceparent"].split("-")[1] == trace_id


async def test_no_token_means_no_authorization_header(servers: list[grpc.aio.Server]) -> None:
    port = free_port()
    recorder = Recorder()
    servers.append(await _start_health_server(port, recorder))

    async with connect(HealthStub, f"127.0.0.1:{port}", token_provider=static_token(None)) as c:
        await c.stub.Check(health_pb2.HealthCheckRequest())

    assert "authorization" not in recorder.calls[0][1]


async def test_calls_get_the_default_deadline(servers: list[grpc.aio.Server]) -> None:
    port = free_port()
    servers.append(await _start_health_server(port, Recorder(delay=3.0)))

    async with connect(HealthStub, f"127.0.0.1:{port}", default_timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await client.stub.Check(health_pb2.HealthCheckRequest())
        elapsed = time.monotonic() - started

    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5


async def test_named_constructor_calls_the_generated_service(
    servers: list[grpc.aio.Server],
) -> None:
    port = free_port()
    recorder = Recorder()
    server = grpc.aio.server(interceptors=[recorder])
    # the generated base servicer answers UNIMPLEMENTED to every RPC
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(
        retrieval_pb2_grpc.RetrievalServiceServicer(),  # type: ignore[abstract]
        server,
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    servers.append(server)

    async with retrieval_client(f"127.0.0.1:{port}", token_provider=static_token("t")) as c:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await c.stub.GetChunk(retrieval_pb2.GetChunkRequest(chunk_id="c1"))

    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert [method for method, _ in recorder.calls] == [
        "/ledgerlens.retrieval.v1.RetrievalService/GetChunk"
    ]
    assert recorder.calls[0][1]["authorization"] == "Bearer t"

"""The runtime interceptor on all four RPC kinds, and its fail-closed policy table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from prometheus_client import CollectorRegistry

from ledgerlens.options.v1 import auth_pb2
from ledgerlens.runtime.auth import TokenVerifier, current_principal
from ledgerlens.runtime.errors import NotFound, from_rpc_error
from ledgerlens.runtime.interceptors import (
    AuthPolicyError,
    MethodPolicy,
    RuntimeInterceptor,
    policies_from_descriptors,
)
from ledgerlens.runtime.metrics import RpcMetrics
from ledgerlens.runtime.server import build_server

pytestmark = pytest.mark.integration

SERVICE = "test.kinds.v1.Echo"
Ctx = grpc.aio.ServicerContext[bytes, bytes]


def _same(data: bytes) -> bytes:
    return data


RAW = {"request_serializer": _same, "response_deserializer": _same}


async def unary_unary(request: bytes, context: Ctx) -> bytes:
    principal = current_principal()
    assert principal is not None
    return request + b":" + principal.subject.encode()


async def unary_stream(request: bytes, context: Ctx) -> AsyncIterator[bytes]:
    for i in range(3):
        yield request + str(i).encode()
    if request == b"fail":
        raise NotFound("no more", resource_type="echo", resource_name="fail")


async def unary_stream_writer(request: bytes, context: Ctx) -> None:
    for i in range(2):  # the context.write() style of a streaming handler
        await context.write(request + str(i).encode())


async def stream_unary(requests: AsyncIterator[bytes], context: Ctx) -> bytes:
    return b"|".join([r async for r in requests])


async def stream_stream(requests: AsyncIterator[bytes], context: Ctx) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r.upper()


@pytest.fixture
async def kinds_channel(
    verifier: TokenVerifier, metrics: RpcMetrics
) -> AsyncIterator[grpc.aio.Channel]:
    handlers = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "UnaryStreamWriter": grpc.unary_stream_rpc_method_handler(unary_stream_writer),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        "Undeclared": grpc.unary_unary_rpc_method_handler(unary_unary),
    }
    policies = {
        f"/{SERVICE}/{name}": MethodPolicy(scopes=("echo:use",))
        for name in handlers
        if name != "Undeclared"
    }
    interceptor = RuntimeInterceptor(policies=policies, verifier=verifier, metrics=metrics)
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


def _count(metrics: RpcMetrics, method: str, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "ledgerlens_rpc_server_duration_seconds_count",
        {"service": SERVICE, "method": method, "code": code},
    )
    return value or 0.0


async def test_all_four_kinds_are_authenticated_served_and_measured(
    kinds_channel: grpc.aio.Channel, metrics: RpcMetrics, mint: Callable[..., str]
) -> None:
    md = [("authorization", f"Bearer {mint(['echo:use'])}")]
    uu = kinds_channel.unary_unary(f"/{SERVICE}/UnaryUnary", **RAW)
    assert await uu(b"hi", metadata=md, timeout=5) == b"hi:alice"

    us = kinds_channel.unary_stream(f"/{SERVICE}/UnaryStream", **RAW)
    assert [r async for r in us(b"x", metadata=md, timeout=5)] == [b"x0", b"x1", b"x2"]

    usw = kinds_channel.unary_stream(f"/{SERVICE}/UnaryStreamWriter", **RAW)
    assert [r async for r in usw(b"w", metadata=md, timeout=5)] == [b"w0", b"w1"]

    async def requests() -> AsyncIterator[bytes]:
        for r in (b"a", b"b", b"c"):
            yield r

    su = kinds_channel.stream_unary(f"/{SERVICE}/StreamUnary", **RAW)
    assert await su(requests(), metadata=md, timeout=5) == b"a|b|c"

    ss = kinds_channel.stream_stream(f"/{SERVICE}/StreamStream", **RAW)
    assert [r async for r in ss(requests(), metadata=md, timeout=5)] == [b"A", b"B", b"C"]

    for method in ("UnaryUnary", "UnaryStream", "UnaryStreamWriter", "StreamUnary", "StreamStream"):
        assert _count(metrics, method, "OK") == 1, method


async def test_streams_need_a_token_and_map_domain_errors_midway(
    kinds_channel: grpc.aio.Channel, metrics: RpcMetrics, mint: Callable[..., str]
) -> None:
    ss = kinds_channel.stream_stream(f"/{SERVICE}/StreamStream", **RAW)

    async def requests() -> AsyncIterator[bytes]:
        yield b"a"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [r async for r in ss(requests(), timeout=5)]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _count(metrics, "StreamStream", "UNAUTHENTICATED") == 1

    md = [("authorization", f"Bearer {mint(['echo:use'])}")]
    us = kinds_channel.unary_stream(f"/{SERVICE}/UnaryStream", **RAW)
    received: list[Any] = []

    async def consume() -> None:
        async for r in us(b"fail", metadata=md, timeout=5):
            received.append(r)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await consume()
    assert received == [b"fail0", b"fail1", b"fail2"]  # then the error
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    not_found = from_rpc_error(err.value)
    assert isinstance(not_found, NotFound)
    assert (not_found.resource_type, not_found.resource_name) == ("echo", "fail")
    assert _count(metrics, "UnaryStream", "NOT_FOUND") == 1


async def test_a_served_rpc_without_a_policy_is_denied(
    kinds_channel: grpc.aio.Channel, mint: Callable[..., str]
) -> None:
    md = [("authorization", f"Bearer {mint(['echo:use'])}")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await kinds_channel.unary_unary(f"/{SERVICE}/Undeclared", **RAW)(
            b"x", metadata=md, timeout=5
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _service(name: str, policies: dict[str, auth_pb2.AuthPolicy | None]) -> Any:
    """A service descriptor built at run time in the default pool, with given policies."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"test/{name.lower()}.proto", package=f"test.{name.lower()}.v1", syntax="proto3"
    )
    file.dependency.append("google/protobuf/empty.proto")
    service = file.service.add(name=name)
    for method, policy in policies.items():
        m = service.method.add(
            name=method,
            input_type=".google.protobuf.Empty",
            output_type=".google.protobuf.Empty",
        )
        if policy is not None:
            m.options.Extensions[auth_pb2.auth].CopyFrom(policy)
    from google.protobuf import empty_pb2  # noqa: F401  (registers the dependency)

    pool = descriptor_pool.Default()  # type: ignore[no-untyped-call]
    pool.Add(file)
    return pool.FindServiceByName(f"test.{name.lower()}.v1.{name}")


def test_policies_are_read_from_the_contracts(identity_service: Any) -> None:
    policies = policies_from_descriptors([identity_service])
    prefix = "/ledgerlens.identity.v1.IdentityService/"
    assert policies[prefix + "CreateApiKey"] == MethodPolicy(scopes=("keys:admin",))
    assert policies[prefix + "GetJwks"] == MethodPolicy(public=True)
    assert len(policies) == len(identity_service.methods)


def test_an_rpc_without_a_policy_stops_the_server_from_building(
    make_settings: Callable[..., Any], verifier: TokenVerifier
) -> None:
    service = _service("Leaky", {"Guarded": auth_pb2.AuthPolicy(scopes=["a:b"]), "Forgotten": None})
    with pytest.raises(AuthPolicyError, match="Forgotten"):
        build_server(
            make_settings(),
            [(lambda servicer, server: None, object(), service)],
            verifier,
            metrics=RpcMetrics(CollectorRegistry()),
        )


def test_a_policy_must_be_public_or_scoped() -> None:
    service = _service(
        "Muddled",
        {
            "Both": auth_pb2.AuthPolicy(scopes=["a:b"], public=True),
            "Neither": auth_pb2.AuthPolicy(),
        },
    )
    with pytest.raises(AuthPolicyError) as err:
        policies_from_descriptors([service])
    assert "Both" in str(err.value)
    assert "Neither" in str(err.value)

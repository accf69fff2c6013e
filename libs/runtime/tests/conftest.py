"""Shared fixtures of the runtime tests: a real identity-contract server on loopback.

The servicer below implements a few ``ledgerlens.identity.v1.IdentityService`` RPCs
with test behaviour only; everything else (auth, errors, metrics, tracing, health,
reflection, shutdown) comes from the runtime, which is what these tests exercise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer, TokenVerifier, current_principal
from ledgerlens.runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Violations,
)
from ledgerlens.runtime.metrics import RpcMetrics
from ledgerlens.runtime.server import ServiceServer, build_server
from ledgerlens.runtime.settings import ServiceSettings

AUDIENCE = "ledgerlens"
IDENTITY_SERVICE: ServiceDescriptor = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


class FakeIdentity(identity_pb2_grpc.IdentityServiceServicer):
    """Test behaviour selected by the request's ``name``:
    ``""`` invalid argument, ``dup`` already exists, ``busy`` resource exhausted,
    ``boom`` an unexpected exception, ``late`` deadline exceeded, ``many`` five field
    violations, ``slow:<seconds>`` sleeps first."""

    def __init__(self) -> None:
        self.completed: list[str] = []

    async def CreateApiKey(
        self, request: identity_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.CreateApiKeyResponse:
        name = request.name
        if not name:
            raise InvalidArgument("the key needs a name", [("name", "must be 1-100 characters")])
        if name == "dup":
            raise AlreadyExists("a key named dup exists", metadata={"name": name})
        if name == "busy":
            raise ResourceExhausted("too many keys created", retry_after=2.5)
        if name == "boom":
            raise RuntimeError("database password is hunter2")
        if name == "late":
            raise DeadlineExceeded("every provider was slower than the deadline")
        if name == "many":
            problems = Violations()
            for i in range(5):
                problems.add(f"scopes[{i}]", "unknown scope")
            problems.raise_if_any("key")
        if name.startswith("slow:"):
            await asyncio.sleep(float(name.removeprefix("slow:")))
        principal = current_principal()
        assert principal is not None
        self.completed.append(name)
        return identity_pb2.CreateApiKeyResponse(
            key=identity_pb2.ApiKey(
                key_id="llk_test", tenant_id=principal.tenant, name=name, scopes=request.scopes
            ),
            secret="s3cret",
        )

    async def Introspect(
        self, request: identity_pb2.IntrospectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.IntrospectResponse:
        principal = current_principal()
        assert principal is not None
        return identity_pb2.IntrospectResponse(
            active=True,
            subject=principal.subject,
            tenant_id=principal.tenant,
            scopes=sorted(principal.scopes),
            jti=principal.token_id,
        )

    async def GetJwks(
        self, request: identity_pb2.GetJwksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.GetJwksResponse:
        assert current_principal() is None  # public: nobody is authenticated
        return identity_pb2.GetJwksResponse(jwks_json='{"keys": []}', max_age_seconds=60)


@pytest.fixture(scope="session")
def issuer() -> DevTokenIssuer:
    return DevTokenIssuer()


@pytest.fixture
def verifier(issuer: DevTokenIssuer) -> TokenVerifier:
    return TokenVerifier(
        issuer=issuer.issuer, audience=AUDIENCE, static_jwks=issuer.jwks(), leeway_seconds=5
    )


@pytest.fixture
def mint(issuer: DevTokenIssuer) -> Callable[..., str]:
    """``mint(scopes, **kw)``: a valid token for subject ``alice`` of tenant ``acme``."""

    def _mint(scopes: Iterable[str] = ("keys:admin",), **kwargs: object) -> str:
        kwargs.setdefault("tenant", "acme")
        kwargs.setdefault("audience", AUDIENCE)
        return issuer.issue("alice", scopes, **kwargs)  # type: ignore[arg-type]

    return _mint


@pytest.fixture
def metrics() -> RpcMetrics:
    return RpcMetrics(CollectorRegistry())


def _settings(**overrides: object) -> ServiceSettings:
    values: dict[str, object] = {
        "service_name": "identity-test",
        "host": "127.0.0.1",
        "grpc_port": 0,
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return ServiceSettings.model_validate(values)


@pytest.fixture
def make_settings() -> Callable[..., ServiceSettings]:
    """``make_settings(**overrides)``: loopback, port 0, short shutdown grace."""
    return _settings


@pytest.fixture
def servicer() -> FakeIdentity:
    return FakeIdentity()  # type: ignore[abstract]  # implements only what tests use


@pytest.fixture
def identity_service() -> ServiceDescriptor:
    return IDENTITY_SERVICE


@pytest.fixture
async def server(
    servicer: FakeIdentity,
    verifier: TokenVerifier,
    metrics: RpcMetrics,
    span_exporter: InMemorySpanExporter,
) -> AsyncIterator[ServiceServer]:
    """The identity contract served by the runtime (auth on) on a free loopback port."""
    srv = build_server(
        _settings(),
        [(identity_pb2_grpc.add_IdentityServiceServicer_to_server, servicer, IDENTITY_SERVICE)],
        verifier,
        metrics=metrics,
    )
    await srv.start()
    yield srv
    await srv.stop(0)


@pytest.fixture
async def channel(server: ServiceServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> identity_pb2_grpc.IdentityServiceAsyncStub:
    return identity_pb2_grpc.IdentityServiceStub(channel)


@pytest.fixture
def auth_md(mint: Callable[..., str]) -> Callable[..., tuple[tuple[str, str], ...]]:
    """``auth_md(scopes=("keys:admin",), **kw)``: call metadata with a fresh bearer token."""

    def _md(
        scopes: Iterable[str] = ("keys:admin",), **kwargs: object
    ) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint(scopes, **kwargs)}"),)

    return _md

"""Every RPC of every service refuses a call without a token (UNAUTHENTICATED) and a
token without the RPC's scope (PERMISSION_DENIED), over the real sockets of the running
platform.

The RPCs come from the generated contracts: every ``ledgerlens.<svc>.v1`` file
descriptor's services and methods, with the ``(ledgerlens.options.v1.auth)`` option of
each (the policy the services' auth interceptor enforces). Each method is called with
the generic gRPC multi-callable of its kind (unary or streaming either way) and a
request of the right shape, so a new RPC is swept without a line here; and a last test
checks, through server reflection, that the sweep covers exactly the RPCs the running
services serve.

The token without the scope is the strongest one: its key holds every scope any RPC
asks for except the one checked. Public RPCs (the option says ``public``) are called
without a token and must not be refused for it; they are reported as skipped.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from _platform import SERVICES, Platform, bearer
from google.protobuf import json_format
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import ledgerlens.common.v1.common_pb2 as common_pb2
from ledgerlens.options.v1 import auth_pb2
from ledgerlens.runtime.interceptors import policies_from_descriptors

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CALL_TIMEOUT_SECONDS = 20.0
SHA = "ab" * 32


# -- the RPCs, from the generated descriptors --------------------------------------------


def contract_services() -> list[ServiceDescriptor]:
    """Every service of every generated ``ledgerlens.<pkg>.v1`` contract module."""
    root = Path(common_pb2.__file__).resolve().parents[2]  # .../src/ledgerlens
    services: list[ServiceDescriptor] = []
    for path in sorted(root.glob("*/v1/*_pb2.py")):
        package = path.parent.parent.name
        module = importlib.import_module(f"ledgerlens.{package}.v1.{path.stem}")
        services.extend(module.DESCRIPTOR.services_by_name.values())
    return services


@dataclass(frozen=True)
class Rpc:
    service: str  # the platform's service name (identity, ingestion, ...)
    descriptor: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def policy(self) -> auth_pb2.AuthPolicy:
        options = self.descriptor.GetOptions()
        assert options.HasExtension(auth_pb2.auth), f"{self.path} has no auth option"
        policy: auth_pb2.AuthPolicy = options.Extensions[auth_pb2.auth]
        return policy

    @property
    def id(self) -> str:
        suffix = (
            "-public(skipped: no token needed by its auth option)" if self.policy.public else ""
        )
        return f"{self.service}.{self.descriptor.name}{suffix}"


def _platform_name(service: ServiceDescriptor) -> str:
    package = service.full_name.split(".")  # ledgerlens.<svc>.v1.<Name>
    assert package[0] == "ledgerlens", service.full_name
    assert package[2] == "v1", service.full_name
    return package[1]


SWEEP = [
    Rpc(_platform_name(service), method)
    for service in contract_services()
    for method in service.methods
]
ALL_SCOPES = sorted({scope for rpc in SWEEP for scope in rpc.policy.scopes})


# -- minimal requests of the right shape (an RPC not listed gets its empty message) ------

SAMPLES: dict[str, dict[str, Any]] = {
    "CreateApiKey": {"tenantId": "acme", "name": "sweep", "scopes": ["search:read"]},
    "ListApiKeys": {"tenantId": "acme", "pageSize": 10},
    "RevokeApiKey": {"keyId": "llk_0000000000000000", "reason": "sweep"},
    "Introspect": {"token": "not-a-token"},
    "RotateSigningKey": {"algorithm": "SIGNING_ALGORITHM_ES256"},
    "EnrollCertificate": {"enrollmentId": "sweep", "csrPem": "-----BEGIN CERTIFICATE REQUEST-----"},
    "RevokeCertificate": {"serial": "01"},
    "IngestDocument": {
        "sourceUrl": "https://sweep.example/doc.md",
        "content": "IyBzd2VlcAo=",  # "# sweep\n"
        "contentType": "text/markdown",
    },
    "IngestStream": {
        "correlationId": "1",
        "document": {"sourceUrl": "https://sweep.example/doc.md", "content": "IyBzd2VlcAo="},
    },
    "GetDocument": {"documentId": "doc_sweep"},
    "ListDocuments": {"pageSize": 10},
    "DeleteDocument": {"documentId": "doc_sweep", "reason": "sweep"},
    "Search": {"query": "base fee", "topK": 3},
    "SearchStream": {"search": {"query": "base fee", "topK": 3}},
    "BatchSearch": {"searches": [{"query": "base fee"}]},
    "GetChunk": {"chunkId": "chunk_sweep"},
    "Chat": {"messages": [{"role": "ROLE_USER", "content": "hello"}]},
    "ChatStream": {"chat": {"messages": [{"role": "ROLE_USER", "content": "hello"}]}},
    "Embed": {"inputs": ["hello"]},
    "Moderate": {"inputs": ["hello"]},
    "Answer": {"query": "How is the base fee burned?"},
    "AnswerStream": {"answer": {"query": "How is the base fee burned?"}},
    "GetUsage": {"granularity": "USAGE_GRANULARITY_DAY"},
    "SubmitTransaction": {"function": "GetAnchor", "args": ["ZG9j", "MQ=="]},
    "EvaluateTransaction": {"function": "GetAnchor", "args": ["ZG9j", "MQ=="]},
    "GetCommitStatus": {"txId": SHA},
    "StreamEvents": {"startBlock": "0"},
    "AnchorDocument": {
        "documentId": "doc_sweep",
        "version": 1,
        "sha256": SHA,
        "sourceUrl": "https://sweep.example/doc.md",
    },
    "VerifyDocument": {"sha256": SHA},
    "GetAnchorHistory": {"documentId": "doc_sweep"},
    "AnchorAudit": {
        "record": {
            "requestId": "sweep",
            "promptSha256": SHA,
            "answerSha256": SHA,
            "completedAt": "2026-01-01T00:00:00Z",
        }
    },
    "GetAuditRecord": {"requestId": "sweep"},
    "GetCrl": {},
    "GetJwks": {},
    "GetCaInfo": {},
}


def request_of(rpc: Rpc, overrides: dict[str, Any] | None = None) -> Message:
    message_class = GetMessageClass(rpc.descriptor.input_type)
    sample = overrides if overrides is not None else SAMPLES.get(rpc.descriptor.name, {})
    request: Message = json_format.ParseDict(sample, message_class())
    return request


def call(channel: grpc.Channel, rpc: Rpc, request: Message, token: str | None) -> grpc.StatusCode:
    """Call ``rpc`` with ``request`` (and ``token``); the status code it ended with."""
    method = rpc.descriptor
    response_class = GetMessageClass(method.output_type)
    kwargs = {
        "request_serializer": lambda message: message.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }
    metadata = bearer(token) if token is not None else None
    argument: Any = iter([request]) if method.client_streaming else request
    try:
        if method.client_streaming and method.server_streaming:
            responses = channel.stream_stream(rpc.path, **kwargs)(
                argument, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )
        elif method.server_streaming:
            responses = channel.unary_stream(rpc.path, **kwargs)(
                argument, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )
        elif method.client_streaming:
            channel.stream_unary(rpc.path, **kwargs)(
                argument, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )
            return grpc.StatusCode.OK, ""
        else:
            channel.unary_unary(rpc.path, **kwargs)(
                argument, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS
            )
            return grpc.StatusCode.OK, ""
        next(iter(responses), None)  # the first message, or the status
        responses.cancel()  # a stream that did start (e.g. events) is not waited for
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channels(platform: Platform) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: grpc.insecure_channel(platform.endpoints[name].grpc) for name in SERVICES}
    yield opened
    for channel in opened.values():
        channel.close()


class TokensWithout:
    """Tokens of keys that hold every scope but one (made once per scope)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._tokens: dict[str, str] = {}  # tokens live 15 minutes: enough for the module

    def __call__(self, missing: str) -> str:
        if missing not in self._tokens:
            scopes = [scope for scope in ALL_SCOPES if scope != missing]
            key = self.platform.create_key(scopes, tenant="sweep", name=f"all but {missing}")
            assert missing not in key.scopes
            self._tokens[missing] = self.platform.token(key)
        return self._tokens[missing]


@pytest.fixture(scope="module")
def tokens_without(platform: Platform) -> TokensWithout:
    return TokensWithout(platform)


# -- the sweep -----------------------------------------------------------------------------


def test_every_rpc_declares_its_auth_policy() -> None:
    """The runtime reads the same policies, and the sweep has all five services."""
    policies = policies_from_descriptors(contract_services())
    assert set(policies) == {rpc.path for rpc in SWEEP}
    assert {rpc.service for rpc in SWEEP} == set(SERVICES)
    for rpc in SWEEP:
        assert policies[rpc.path].public == rpc.policy.public
        assert set(policies[rpc.path].scopes) == set(rpc.policy.scopes)


@pytest.mark.parametrize("rpc", SWEEP, ids=[rpc.id for rpc in SWEEP])
def test_refuses_a_call_without_a_token(
    rpc: Rpc, channels: dict[str, grpc.Channel], platform: Platform
) -> None:
    channel = channels[rpc.service]
    if rpc.policy.public:
        assert not rpc.policy.scopes
        overrides = None
        if rpc.descriptor.name == "IssueToken":  # public, but it wants real credentials
            admin = platform.admin
            overrides = {"clientId": admin.client_id, "clientSecret": admin.client_secret}
        code, details = call(channel, rpc, request_of(rpc, overrides), token=None)
        assert code == grpc.StatusCode.OK, (code, details)
        pytest.skip(f"{rpc.path} is public by its auth option (answered without a token)")
    code, details = call(channel, rpc, request_of(rpc), token=None)
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)

    # a malformed token is no better than none
    code, details = call(channel, rpc, request_of(rpc), token="not.a.jwt")
    assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)


@pytest.mark.parametrize("rpc", SWEEP, ids=[rpc.id for rpc in SWEEP])
def test_refuses_a_token_without_the_rpcs_scope(
    rpc: Rpc, channels: dict[str, grpc.Channel], tokens_without: TokensWithout
) -> None:
    if rpc.policy.public:
        pytest.skip(f"{rpc.path} is public by its auth option: no scope to lack")
    assert rpc.policy.scopes
    for scope in rpc.policy.scopes:
        code, details = call(channels[rpc.service], rpc, request_of(rpc), tokens_without(scope))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
        assert f"missing scope {scope!r}" in details, details


#: what the control below sends instead of the sample: nothing written that another test
#: could see (no document ingested, no signing key rotated), no stream left waiting
HARMLESS: dict[str, dict[str, Any]] = {
    "IngestDocument": {"sourceUrl": "https://sweep.example/empty.md"},  # empty content
    "IngestStream": {"correlationId": "1", "document": {"sourceUrl": "https://sweep.example/e.md"}},
    "RotateSigningKey": {},  # no algorithm
    "StreamEvents": {"startBlock": "1000000000"},  # beyond the height
}


@pytest.mark.parametrize("rpc", SWEEP, ids=[rpc.id for rpc in SWEEP])
def test_admits_a_token_with_the_rpcs_scopes(
    rpc: Rpc, channels: dict[str, grpc.Channel], platform: Platform, tokens_without: TokensWithout
) -> None:
    """The control: a token with every scope gets past auth with the same kind of
    request, so the refusals above come from the missing token or scope alone."""
    if rpc.policy.public:
        pytest.skip(f"{rpc.path} is public by its auth option")
    token = tokens_without("")  # every scope
    request = request_of(rpc, HARMLESS.get(rpc.descriptor.name))
    code, details = call(channels[rpc.service], rpc, request, token)
    assert code not in {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }, (code, details)


def test_the_sweep_covers_every_rpc_the_services_serve(
    channels: dict[str, grpc.Channel],
) -> None:
    """Server reflection of each running service lists what it serves (beyond health
    and reflection): exactly the RPCs swept above."""
    served: set[str] = set()
    for name, channel in channels.items():
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        for service_name in database.get_services():
            if service_name.startswith(("grpc.health.", "grpc.reflection.")):
                continue
            assert service_name.startswith(f"ledgerlens.{name}.v1."), (name, service_name)
            service = pool.FindServiceByName(service_name)
            served |= {f"/{service.full_name}/{method.name}" for method in service.methods}
    assert served == {rpc.path for rpc in SWEEP}

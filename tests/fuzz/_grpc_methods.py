"""Every RPC of the five contracts (from the generated descriptors), a generic way to call
one over a real channel, and a plausible valid request per RPC.

Methods are discovered from ``ledgerlens.<svc>.v1`` descriptors, so an RPC added to a
contract is fuzzed without a change here (it gets an empty request as its "valid" one
until :data:`VALID` knows better).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from ledgerlens.identity.v1 import identity_pb2
from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2

SERVICES = ("identity", "ingestion", "retrieval", "inference", "ledger")

#: a status a server must never answer with, whatever the request
FORBIDDEN = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)

#: how long one call may take; a fuzzed request must be answered, not hang
CALL_TIMEOUT = 30.0
#: ``GetCommitStatus(wait=true)`` waits within the call's deadline by contract
WAIT_TIMEOUT = 1.0
#: items read from a server stream (per request sent) before the client cancels it
STREAM_ITEMS = 3
#: seconds a server stream may stay quiet before the client cancels it
STREAM_IDLE = 1.0


@dataclass(frozen=True)
class Method:
    service: str  # identity, ingestion, ...
    descriptor: MethodDescriptor

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.descriptor.input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(self.descriptor.output_type)

    @property
    def id(self) -> str:
        return f"{self.service}.{self.name}"


def descriptor_method_count() -> int:
    total = 0
    for svc in SERVICES:
        module = importlib.import_module(f"ledgerlens.{svc}.v1.{svc}_pb2")
        total += sum(len(s.methods) for s in module.DESCRIPTOR.services_by_name.values())
    return total


def discover_methods() -> list[Method]:
    found = []
    for svc in SERVICES:
        module = importlib.import_module(f"ledgerlens.{svc}.v1.{svc}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            found.extend(Method(svc, m) for m in service.methods)
    return found


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    #: the responses read (a server stream: at most STREAM_ITEMS of them)
    responses: list[Message] = field(default_factory=list)
    #: True when the client ended the call (stream read far enough, or idle)
    cancelled_by_client: bool = False


def _timeout(requests: list[Message]) -> float:
    waits = any(getattr(r, "wait", False) is True for r in requests)
    return WAIT_TIMEOUT if waits else CALL_TIMEOUT


async def call(
    channel: grpc.aio.Channel,
    method: Method,
    requests: list[Message],
    metadata: tuple[tuple[str, str], ...],
) -> Outcome:
    """Send ``requests`` (one, or several for a client stream) and return the status.

    A server stream is read until it ends, or for :data:`STREAM_ITEMS` items, or until
    it stays quiet for :data:`STREAM_IDLE` seconds (a follow stream such as
    ``StreamEvents`` never ends by itself); then the client cancels it.
    """
    d = method.descriptor
    serialize = method.request_class.SerializeToString
    deserialize = method.response_class.FromString
    timeout = _timeout(requests)
    try:
        if not d.client_streaming and not d.server_streaming:
            unary = channel.unary_unary(method.path, serialize, deserialize)
            response = await unary(requests[0], metadata=metadata, timeout=timeout)
            return Outcome(grpc.StatusCode.OK, responses=[response])

        async def feed() -> AsyncIterator[Message]:
            for request in requests:
                yield request

        if d.client_streaming and not d.server_streaming:
            stream_unary = channel.stream_unary(method.path, serialize, deserialize)
            response = await stream_unary(feed(), metadata=metadata, timeout=timeout)
            return Outcome(grpc.StatusCode.OK, responses=[response])
        if d.server_streaming and not d.client_streaming:
            streaming: Any = channel.unary_stream(method.path, serialize, deserialize)(
                requests[0], metadata=metadata, timeout=timeout
            )
        else:
            streaming = channel.stream_stream(method.path, serialize, deserialize)(
                feed(), metadata=metadata, timeout=timeout
            )
        responses: list[Message] = []
        while len(responses) < STREAM_ITEMS * max(1, len(requests)):
            try:
                item = await asyncio.wait_for(streaming.read(), STREAM_IDLE)
            except TimeoutError:
                streaming.cancel()
                return Outcome(grpc.StatusCode.CANCELLED, "idle", responses, True)
            if item is grpc.aio.EOF:
                return Outcome(grpc.StatusCode.OK, responses=responses)
            responses.append(item)
        streaming.cancel()
        return Outcome(grpc.StatusCode.CANCELLED, "read enough", responses, True)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details() or "")


def item_errors(message: Message) -> list[tuple[int, str]]:
    """``(code, message)`` of every ``ledgerlens.common.v1.ItemError`` set in ``message``
    (per-item failures of bulk RPCs, which stand in for a gRPC status)."""
    found: list[tuple[int, str]] = []
    if message.DESCRIPTOR.full_name == "ledgerlens.common.v1.ItemError":
        return [(message.code, message.message)]  # type: ignore[attr-defined]
    for fd, value in message.ListFields():
        if fd.type != fd.TYPE_MESSAGE or fd.message_type.GetOptions().map_entry:
            continue
        for item in value if fd.label == fd.LABEL_REPEATED else [value]:
            found.extend(item_errors(item))
    return found


# -- valid requests ----------------------------------------------------------------------


def _ts(year: int = 2026) -> Any:
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime(year, 1, 1, tzinfo=UTC))
    return stamp


def _search(query: str = "rollups data availability") -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(
        query=query,
        top_k=3,
        filter=retrieval_pb2.SearchFilter(
            chains=["ethereum"], published_after=_ts(2000), published_before=_ts(2030)
        ),
        fusion=retrieval_pb2.FUSION_MODE_WEIGHTED,
        dense_weight=0.5,
    )


def _ingest(seed: Any) -> ingestion_pb2.IngestDocumentRequest:
    from ledgerlens.common.v1 import common_pb2

    return ingestion_pb2.IngestDocumentRequest(
        source_url="https://example.org/fuzz/valid.md",
        content=b"# Valid\n\nBlob gas is priced separately from execution gas.\n",
        content_type="text/markdown",
        metadata=common_pb2.DocumentMetadata(
            doc_type=common_pb2.DOC_TYPE_EIP,
            chain="ethereum",
            authors=["Vitalik Buterin (@vbuterin)"],
            tags=["gas"],
            title="Valid",
            published_at=_ts(2024),
            contract_addresses=["0x52908400098527886E0F7030069857D2E4169EE7"],
            attributes={"eip": "4844"},
        ),
        idempotency_key="fuzz-valid-1",
        fetched_at=_ts(2026),
    )


def _anchor(seed: Any) -> ledger_pb2.AnchorDocumentRequest:
    return ledger_pb2.AnchorDocumentRequest(
        document_id="doc-fuzz-valid",
        version=1,
        sha256="12" * 32,
        source_url="https://example.org/fuzz/valid.md",
        ingested_at=_ts(),
    )


def _audit(seed: Any) -> ledger_pb2.AuditRecord:
    return ledger_pb2.AuditRecord(
        request_id="req-fuzz-valid",
        prompt_sha256="34" * 32,
        answer_sha256="56" * 32,
        model="extractive",
        tenant_id="acme",
        api_key_id=seed.admin_key_id,
        cited_chunk_ids=[seed.chunk_id],
        completed_at=_ts(),
    )


def _chat() -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        messages=[
            inference_pb2.ChatMessage(role=inference_pb2.ROLE_SYSTEM, content="Be brief."),
            inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content="What is a rollup?"),
        ],
        temperature=0.2,
        max_tokens=64,
        stop=["\n\n"],
    )


def _answer() -> inference_pb2.AnswerRequest:
    return inference_pb2.AnswerRequest(
        query="what do optimistic rollups post?",
        top_k=3,
        max_tokens=128,
        temperature=0.0,
    )


#: RPC id -> a plausible valid request, given the seed objects
VALID: dict[str, Callable[[Any], Message]] = {
    "identity.CreateApiKey": lambda s: identity_pb2.CreateApiKeyRequest(
        name="fuzz", scopes=["search:read"], expires_at=_ts(2030)
    ),
    "identity.ListApiKeys": lambda s: identity_pb2.ListApiKeysRequest(
        include_inactive=True, page_size=10
    ),
    "identity.RevokeApiKey": lambda s: identity_pb2.RevokeApiKeyRequest(
        key_id=s.victim_key_id, reason="fuzz"
    ),
    "identity.IssueToken": lambda s: identity_pb2.IssueTokenRequest(
        client_id=s.admin_key_id,
        client_secret=s.admin_secret,
        scopes=["search:read"],
        audience="ledgerlens",
    ),
    "identity.GetJwks": lambda s: identity_pb2.GetJwksRequest(),
    "identity.Introspect": lambda s: identity_pb2.IntrospectRequest(token=s.token),
    "identity.RotateSigningKey": lambda s: identity_pb2.RotateSigningKeyRequest(
        algorithm=identity_pb2.SIGNING_ALGORITHM_ES256
    ),
    "identity.EnrollCertificate": lambda s: identity_pb2.EnrollCertificateRequest(
        enrollment_id=s.enrolled_id,
        csr_pem=s.csr_pem,
        attributes=[identity_pb2.CertificateAttribute(name="team", value="fuzz")],
    ),
    "identity.RevokeCertificate": lambda s: identity_pb2.RevokeCertificateRequest(
        enrollment_id=s.enrolled_id,
        reason=identity_pb2.REVOCATION_REASON_SUPERSEDED,
    ),
    "identity.GetCrl": lambda s: identity_pb2.GetCrlRequest(format=identity_pb2.CRL_FORMAT_PEM),
    "identity.GetCaInfo": lambda s: identity_pb2.GetCaInfoRequest(),
    "ingestion.IngestDocument": _ingest,
    "ingestion.IngestStream": lambda s: ingestion_pb2.IngestStreamRequest(
        correlation_id="c1", document=_ingest(s)
    ),
    "ingestion.GetDocument": lambda s: ingestion_pb2.GetDocumentRequest(
        document_id=s.document_id, version=1
    ),
    "ingestion.ListDocuments": lambda s: ingestion_pb2.ListDocumentsRequest(
        filter=ingestion_pb2.DocumentFilter(
            chains=["ethereum"],
            source_url_prefix="https://example.org/",
            published_after=_ts(2000),
            published_before=_ts(2030),
        ),
        page_size=5,
    ),
    "ingestion.DeleteDocument": lambda s: ingestion_pb2.DeleteDocumentRequest(
        document_id=s.deletable_id, reason="fuzz"
    ),
    "retrieval.Search": lambda s: _search(),
    "retrieval.SearchStream": lambda s: retrieval_pb2.SearchStreamRequest(search=_search()),
    "retrieval.BatchSearch": lambda s: retrieval_pb2.BatchSearchRequest(
        searches=[_search(), _search("base fee")]
    ),
    "retrieval.GetChunk": lambda s: retrieval_pb2.GetChunkRequest(chunk_id=s.chunk_id),
    "inference.Chat": lambda s: _chat(),
    "inference.ChatStream": lambda s: inference_pb2.ChatStreamRequest(chat=_chat()),
    "inference.Embed": lambda s: inference_pb2.EmbedRequest(inputs=["rollups", "base fee"]),
    "inference.Moderate": lambda s: inference_pb2.ModerateRequest(inputs=["a calm question"]),
    "inference.Answer": lambda s: _answer(),
    "inference.AnswerStream": lambda s: inference_pb2.AnswerStreamRequest(answer=_answer()),
    "inference.GetUsage": lambda s: inference_pb2.GetUsageRequest(
        start_time=_ts(2020),
        end_time=_ts(2030),
        granularity=inference_pb2.USAGE_GRANULARITY_DAY,
        page_size=10,
    ),
    "ledger.SubmitTransaction": lambda s: ledger_pb2.SubmitTransactionRequest(
        function="AnchorDocument",
        args=[b"doc-fuzz-submit", b"1", b"78" * 32, b"", b"2026-01-01T00:00:00Z"],
    ),
    "ledger.EvaluateTransaction": lambda s: ledger_pb2.EvaluateTransactionRequest(
        function="GetAnchor", args=[s.anchored_document_id.encode(), b"1"]
    ),
    "ledger.GetCommitStatus": lambda s: ledger_pb2.GetCommitStatusRequest(tx_id=s.tx_id),
    "ledger.StreamEvents": lambda s: ledger_pb2.StreamEventsRequest(start_block=0),
    "ledger.AnchorDocument": _anchor,
    "ledger.VerifyDocument": lambda s: ledger_pb2.VerifyDocumentRequest(
        sha256=s.anchored_sha256, document_id=s.anchored_document_id, version=1
    ),
    "ledger.GetAnchorHistory": lambda s: ledger_pb2.GetAnchorHistoryRequest(
        document_id=s.anchored_document_id
    ),
    "ledger.AnchorAudit": lambda s: ledger_pb2.AnchorAuditRequest(record=_audit(s)),
    "ledger.GetAuditRecord": lambda s: ledger_pb2.GetAuditRecordRequest(
        request_id=s.audit_request_id
    ),
}

"""Requests and events checked and turned into domain values, with every problem named.

Each check collects ``(field, description)`` violations and raises one
:class:`~ledgerlens.runtime.errors.InvalidArgument` listing them all, so a caller fixes
a request in one round. The limits are the proto's (and the contract's, which checks
again on every endorser: the service's checks give field paths, the contract's keep the
ledger safe from any client).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Final

from google.protobuf import timestamp_pb2

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime import errors
from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.ledger.anchoring import DocumentAnchor, NewAudit
from ledgerlens.services.ledger.contract import (
    MAX_CITED_CHUNKS,
    MAX_ID_LENGTH,
    MAX_URL_LENGTH,
)

__all__ = [
    "MAX_ARGS",
    "MAX_ARGS_BYTES",
    "MAX_TRANSIENT",
    "Violations",
    "anchor_from_provenance",
    "anchor_request",
    "audit_from_completion",
    "audit_request",
    "rfc3339",
]

MAX_ARGS: Final = 64
MAX_ARGS_BYTES: Final = 1024 * 1024
MAX_TRANSIENT: Final = 64
MAX_FUNCTION_LENGTH: Final = 256
MAX_TX_ID_LENGTH: Final = 128
MAX_EVENT_NAMES: Final = 64

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_TX_ID = re.compile(r"^[0-9A-Za-z_.:-]{1,128}$")
#: what the audit record holds when the completion event left a field empty (the
#: contract requires every identifier; an audit record is still worth anchoring).
UNKNOWN: Final = "-"


class Violations(errors.Violations):
    """The runtime's collector of field violations, with the ledger's own checks."""

    def sha256(self, value: str, field: str) -> str:
        if not _SHA256.match(value):
            self.add(field, f"must be 64 hex digits, got {value[:80]!r}")
        return value.lower()

    def identifier(self, value: str, field: str, *, required: bool = True) -> str:
        if not value:
            if required:
                self.add(field, "is required")
        elif len(value) > MAX_ID_LENGTH:
            self.add(field, f"must be at most {MAX_ID_LENGTH} characters")
        elif "\x00" in value or "\U0010ffff" in value:
            self.add(field, "must not contain U+0000 or U+10FFFF")
        return value

    def tx_id(self, value: str, field: str = "tx_id") -> str:
        if not _TX_ID.match(value):
            self.add(field, "must be 1-128 characters of [0-9A-Za-z_.:-]")
        return value


def rfc3339(stamp: timestamp_pb2.Timestamp, field: str = "timestamp") -> str:
    """``stamp`` in RFC 3339; INVALID_ARGUMENT naming ``field`` when out of range."""
    return errors.timestamp_value(stamp, field).isoformat()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def check_invocation(
    function: str,
    args: Iterable[bytes],
    transient: Mapping[str, bytes],
    violations: Violations,
) -> list[bytes]:
    if not function:
        violations.add("function", "is required")
    elif len(function) > MAX_FUNCTION_LENGTH:
        violations.add("function", f"must be at most {MAX_FUNCTION_LENGTH} characters")
    arguments = [bytes(a) for a in args]
    if len(arguments) > MAX_ARGS:
        violations.add("args", f"at most {MAX_ARGS} arguments, got {len(arguments)}")
    total = sum(len(a) for a in arguments)
    if total > MAX_ARGS_BYTES:
        violations.add("args", f"at most {MAX_ARGS_BYTES} bytes in total, got {total}")
    if len(transient) > MAX_TRANSIENT:
        violations.add("transient", f"at most {MAX_TRANSIENT} entries, got {len(transient)}")
    return arguments


def _document(
    document_id: str,
    version: int,
    sha256: str,
    source_url: str,
    ingested_at: str,
    prefix: str,
    what: str,
) -> DocumentAnchor:
    v = Violations()
    v.identifier(document_id, f"{prefix}document_id")
    if version < 1:
        v.add(f"{prefix}version", "must be >= 1")
    digest = v.sha256(sha256, f"{prefix}sha256")
    if len(source_url) > MAX_URL_LENGTH:
        v.add(f"{prefix}source_url", f"must be at most {MAX_URL_LENGTH} characters")
    v.raise_if_any(what)
    return DocumentAnchor(document_id, version, digest, source_url, ingested_at)


def anchor_request(request: ledger_pb2.AnchorDocumentRequest) -> DocumentAnchor:
    """An unset ``ingested_at`` is now: the contract compares versions by checksum only,
    so the time never makes a retry conflict."""
    ingested = (
        rfc3339(request.ingested_at, "ingested_at") if request.HasField("ingested_at") else _now()
    )
    return _document(
        request.document_id,
        request.version,
        request.sha256,
        request.source_url,
        ingested,
        "",
        "AnchorDocumentRequest",
    )


def anchor_from_provenance(provenance: common_pb2.Provenance) -> DocumentAnchor:
    ingested = (
        rfc3339(provenance.ingested_at, "provenance.ingested_at")
        if provenance.HasField("ingested_at")
        else _now()
    )
    return _document(
        provenance.document_id,
        provenance.version,
        provenance.sha256,
        provenance.source_url,
        ingested,
        "provenance.",
        "DocumentIngested event",
    )


def _audit(
    request_id: str,
    prompt_sha256: str,
    answer_sha256: str,
    model: str,
    tenant_id: str,
    api_key_id: str,
    cited: Iterable[str],
    completed_at: timestamp_pb2.Timestamp | None,
    prefix: str,
    what: str,
) -> NewAudit:
    v = Violations()
    v.identifier(request_id, f"{prefix}request_id")
    prompt = v.sha256(prompt_sha256, f"{prefix}prompt_sha256")
    answer = v.sha256(answer_sha256, f"{prefix}answer_sha256")
    for name, value in (("model", model), ("tenant_id", tenant_id), ("api_key_id", api_key_id)):
        v.identifier(value, f"{prefix}{name}")
    chunk_ids = tuple(cited)
    if len(chunk_ids) > MAX_CITED_CHUNKS:
        v.add(f"{prefix}cited_chunk_ids", f"at most {MAX_CITED_CHUNKS} ids")
    for index, chunk_id in enumerate(chunk_ids):
        if not chunk_id or len(chunk_id) > MAX_ID_LENGTH:
            v.add(f"{prefix}cited_chunk_ids[{index}]", f"must be 1-{MAX_ID_LENGTH} characters")
    if completed_at is None:
        v.add(f"{prefix}completed_at", "is required (it is part of the anchored record)")
    v.raise_if_any(what)
    assert completed_at is not None
    return NewAudit(
        request_id,
        prompt,
        answer,
        model,
        tenant_id,
        api_key_id,
        chunk_ids,
        rfc3339(completed_at, f"{prefix}completed_at"),
    )


def audit_request(request: ledger_pb2.AnchorAuditRequest) -> NewAudit:
    if not request.HasField("record"):
        raise InvalidArgument(
            "invalid AnchorAuditRequest: record is required", [("record", "is required")]
        )
    r = request.record
    return _audit(
        r.request_id,
        r.prompt_sha256,
        r.answer_sha256,
        r.model,
        r.tenant_id,
        r.api_key_id,
        r.cited_chunk_ids,
        r.completed_at if r.HasField("completed_at") else None,
        "record.",
        "AnchorAuditRequest",
    )


def audit_from_completion(event: events_pb2.CompletionRecorded) -> NewAudit | None:
    """The audit record of a completion; None when it has no answer (embeddings)."""
    if not event.answer_sha256:
        return None
    return _audit(
        event.completion_id,
        event.prompt_sha256,
        event.answer_sha256,
        event.model or UNKNOWN,
        event.tenant_id or UNKNOWN,
        event.api_key_id or UNKNOWN,
        event.cited_chunk_ids,
        event.occurred_at if event.HasField("occurred_at") else None,
        "",
        "CompletionRecorded event",
    )

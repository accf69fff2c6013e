"""Domain values <-> protobuf messages, shared by the gRPC API and the events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.common.v1 import common_pb2
from ledgerlens.services.ingestion.metadata import DocType, Metadata

__all__ = [
    "DOC_TYPE_FROM_PROTO",
    "DOC_TYPE_TO_PROTO",
    "metadata_from_json",
    "metadata_from_proto",
    "metadata_to_json",
    "metadata_to_proto",
    "timestamp",
    "to_datetime",
]

DOC_TYPE_TO_PROTO: dict[DocType, common_pb2.DocType.ValueType] = {
    DocType.WHITEPAPER: common_pb2.DOC_TYPE_WHITEPAPER,
    DocType.EIP: common_pb2.DOC_TYPE_EIP,
    DocType.GITHUB: common_pb2.DOC_TYPE_GITHUB,
    DocType.FORUM: common_pb2.DOC_TYPE_FORUM,
    DocType.ONCHAIN_EVENT: common_pb2.DOC_TYPE_ONCHAIN_EVENT,
    DocType.OTHER: common_pb2.DOC_TYPE_OTHER,
}
DOC_TYPE_FROM_PROTO = {v: k for k, v in DOC_TYPE_TO_PROTO.items()}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def to_datetime(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def metadata_from_proto(md: common_pb2.DocumentMetadata) -> Metadata:
    """The request's metadata as given (validated later, after the merge)."""
    doc_type = DOC_TYPE_FROM_PROTO.get(md.doc_type) if md.doc_type else None
    return Metadata(
        doc_type=doc_type,
        chain=md.chain,
        contract_addresses=tuple(md.contract_addresses),
        authors=tuple(md.authors),
        published_at=to_datetime(md.published_at) if md.HasField("published_at") else None,
        tags=tuple(md.tags),
        title=md.title,
        attributes=dict(md.attributes),
    )


def metadata_to_proto(md: Metadata) -> common_pb2.DocumentMetadata:
    return common_pb2.DocumentMetadata(
        doc_type=DOC_TYPE_TO_PROTO[md.doc_type] if md.doc_type else common_pb2.DOC_TYPE_OTHER,
        chain=md.chain,
        contract_addresses=list(md.contract_addresses),
        authors=list(md.authors),
        published_at=timestamp(md.published_at),
        tags=list(md.tags),
        title=md.title,
        attributes=dict(md.attributes),
    )


def metadata_to_json(md: Metadata) -> dict[str, Any]:
    return {
        "doc_type": md.doc_type.value if md.doc_type else DocType.OTHER.value,
        "chain": md.chain,
        "contract_addresses": list(md.contract_addresses),
        "authors": list(md.authors),
        "published_at": md.published_at.isoformat() if md.published_at else None,
        "tags": list(md.tags),
        "title": md.title,
        "attributes": dict(md.attributes),
    }


def metadata_from_json(data: dict[str, Any]) -> Metadata:
    published = data.get("published_at")
    return Metadata(
        doc_type=DocType(data["doc_type"]),
        chain=data["chain"],
        contract_addresses=tuple(data["contract_addresses"]),
        authors=tuple(data["authors"]),
        published_at=datetime.fromisoformat(published) if published else None,
        tags=tuple(data["tags"]),
        title=data["title"],
        attributes=dict(data["attributes"]),
    )

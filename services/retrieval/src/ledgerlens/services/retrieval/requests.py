"""Validating search requests: the contract's messages in, domain values out.

Every problem is collected (not just the first) and raised as one INVALID_ARGUMENT
whose field violations name each offending field with its full path
(``searches[3].filter.published_before``), so a client fixes them in one go.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from eth_utils.address import is_checksum_address
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-not-found]

from ledgerlens.common.v1 import common_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.errors import Violations
from ledgerlens.services.retrieval.model import Filter

__all__ = ["Fusion", "Limits", "Query", "parse_batch", "parse_search"]

Fusion = retrieval_pb2.FusionMode

_HEX = set("0123456789abcdefABCDEF")
_MAX_VALUE_CHARS = 2048
_DOC_TYPES = frozenset(v.number for v in common_pb2.DocType.DESCRIPTOR.values if v.number != 0)
# Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799


@dataclass(frozen=True, slots=True)
class Limits:
    max_top_k: int = 100
    default_top_k: int = 10
    max_query_chars: int = 2000
    max_filter_values: int = 100
    max_batch: int = 64


@dataclass(frozen=True, slots=True)
class Query:
    """One validated search."""

    text: str
    filter: Filter
    top_k: int
    min_score: float | None
    fusion: int
    dense_weight: float


def _unknown_fields(message: Message, path: str, errors: Violations) -> None:
    # Fields a newer client sent that this server's contract does not know: a filter
    # the server silently ignored would return chunks that fail it, so it is refused.
    for unknown in UnknownFieldSet(message):
        errors.add(path or "(request)", f"unknown field number {unknown.field_number}")


def _strings(
    values: Sequence[str],
    path: str,
    errors: Violations,
    limits: Limits,
    *,
    lower: bool = False,
) -> frozenset[str]:
    if len(values) > limits.max_filter_values:
        errors.add(path, f"at most {limits.max_filter_values} values, got {len(values)}")
        return frozenset()
    out: set[str] = set()
    for i, raw in enumerate(values):
        value = " ".join(raw.split()) if lower else raw.strip()
        if not value:
            errors.add(f"{path}[{i}]", "must not be empty")
        elif len(value) > _MAX_VALUE_CHARS:
            errors.add(f"{path}[{i}]", f"at most {_MAX_VALUE_CHARS} characters")
        else:
            out.add(value.casefold() if lower else value)
    return frozenset(out)


def _address(value: str) -> str | None:
    body = value[2:]
    if not value.startswith("0x") or len(body) != 40 or not set(body) <= _HEX:
        return None
    if body != body.lower() and body != body.upper() and not is_checksum_address(value):
        return None
    return value.lower()


def _seconds(ts: timestamp_pb2.Timestamp, path: str, errors: Violations) -> tuple[int, int]:
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS) or not (0 <= ts.nanos < 1_000_000_000):
        errors.add(path, "not a valid timestamp (years 1-9999, nanos 0-999999999)")
    return ts.seconds, ts.nanos


def parse_filter(
    pb: retrieval_pb2.SearchFilter, path: str, errors: Violations, limits: Limits
) -> Filter:
    _unknown_fields(pb, path, errors)
    addresses: set[str] = set()
    if len(pb.contract_addresses) > limits.max_filter_values:
        errors.add(f"{path}.contract_addresses", f"at most {limits.max_filter_values} values")
    else:
        for i, raw in enumerate(pb.contract_addresses):
            address = _address(raw.strip())
            if address is None:
                errors.add(
                    f"{path}.contract_addresses[{i}]",
                    f"{raw!r} is not 0x + 40 hex digits with a valid EIP-55 checksum",
                )
            else:
                addresses.add(address)
    doc_types: set[int] = set()
    for i, doc_type in enumerate(pb.doc_types):
        if doc_type not in _DOC_TYPES:
            errors.add(f"{path}.doc_types[{i}]", f"{doc_type} is not a document type")
        else:
            doc_types.add(int(doc_type))
    after = before = None
    if pb.HasField("published_after"):
        seconds, nanos = _seconds(pb.published_after, f"{path}.published_after", errors)
        after = seconds + (1 if nanos else 0)  # inclusive bound on whole seconds
    if pb.HasField("published_before"):
        seconds, nanos = _seconds(pb.published_before, f"{path}.published_before", errors)
        before = seconds + (1 if nanos else 0)  # exclusive bound on whole seconds
        if pb.HasField("published_after") and (
            (pb.published_before.seconds, pb.published_before.nanos)
            <= (pb.published_after.seconds, pb.published_after.nanos)
        ):
            errors.add(f"{path}.published_before", "must be after published_after")
    prefix = pb.source_url_prefix.strip()
    if len(prefix) > _MAX_VALUE_CHARS:
        errors.add(f"{path}.source_url_prefix", f"at most {_MAX_VALUE_CHARS} characters")
    return Filter(
        chains=_strings(pb.chains, f"{path}.chains", errors, limits, lower=True),
        contract_addresses=frozenset(addresses),
        authors=_strings(pb.authors, f"{path}.authors", errors, limits, lower=True),
        doc_types=frozenset(doc_types),
        published_after=after,
        published_before=before,
        tags=_strings(pb.tags, f"{path}.tags", errors, limits, lower=True),
        source_urls=_strings(pb.source_urls, f"{path}.source_urls", errors, limits),
        source_url_prefix=prefix,
        document_ids=_strings(pb.document_ids, f"{path}.document_ids", errors, limits),
    )


def _parse(pb: retrieval_pb2.SearchRequest, path: str, errors: Violations, limits: Limits) -> Query:
    def at(field: str) -> str:
        return f"{path}.{field}" if path else field

    _unknown_fields(pb, path, errors)
    text = pb.query.strip()
    if not text:
        errors.add(at("query"), "must not be empty")
    elif len(text) > limits.max_query_chars:
        errors.add(at("query"), f"at most {limits.max_query_chars} characters, got {len(text)}")
    top_k = pb.top_k or limits.default_top_k
    if pb.top_k < 0 or pb.top_k > limits.max_top_k:
        errors.add(at("top_k"), f"must be 1-{limits.max_top_k} (0 means {limits.default_top_k})")
    min_score = None
    if pb.HasField("min_score"):
        if not math.isfinite(pb.min_score):
            errors.add(at("min_score"), "must be a finite number")
        else:
            min_score = pb.min_score
    fusion = pb.fusion or retrieval_pb2.FUSION_MODE_RRF
    if fusion not in retrieval_pb2.FusionMode.values():
        errors.add(at("fusion"), f"{pb.fusion} is not a fusion mode")
    weight = 0.5
    if pb.HasField("dense_weight"):
        if fusion != retrieval_pb2.FUSION_MODE_WEIGHTED:
            errors.add(at("dense_weight"), "only applies to FUSION_MODE_WEIGHTED")
        elif not (0.0 <= pb.dense_weight <= 1.0):
            errors.add(at("dense_weight"), "must be in [0, 1]")
        else:
            weight = pb.dense_weight
    flt = parse_filter(pb.filter, at("filter"), errors, limits)
    return Query(text, flt, top_k, min_score, fusion, weight)


def parse_search(pb: retrieval_pb2.SearchRequest, limits: Limits) -> Query:
    errors = Violations()
    query = _parse(pb, "", errors, limits)
    errors.raise_if_any("search")
    return query


def parse_batch(pb: retrieval_pb2.BatchSearchRequest, limits: Limits) -> list[Query]:
    errors = Violations()
    _unknown_fields(pb, "", errors)
    if not pb.searches:
        errors.add("searches", "at least one search is required")
    elif len(pb.searches) > limits.max_batch:
        errors.add("searches", f"at most {limits.max_batch} searches, got {len(pb.searches)}")
    queries = (
        []
        if errors.items
        else [_parse(s, f"searches[{i}]", errors, limits) for i, s in enumerate(pb.searches)]
    )
    errors.raise_if_any("batch search")
    return queries

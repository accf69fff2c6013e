"""The anchoring contract's rules, through an in-memory stub (no ledger, no I/O)."""

from __future__ import annotations

import json

import pytest
from _ledger_support import INGESTED_AT, MemoryLedger, anchor_args, audit_args, sha

from ledgerlens.fabric.chaincode import ChaincodeError
from ledgerlens.services.ledger.contract import (
    EVENT_AUDIT_ANCHORED,
    EVENT_DOCUMENT_ANCHORED,
    EVENT_DOCUMENTS_ANCHORED,
    AnchoringContract,
    composite_key,
    composite_range,
)


@pytest.fixture
def chain() -> MemoryLedger:
    return MemoryLedger()


def refused(chain: MemoryLedger, function: str, *args: bytes | str) -> ChaincodeError:
    with pytest.raises(ChaincodeError) as info:
        chain.invoke(function, *args)
    return info.value


@pytest.mark.parametrize(
    ("args", "status", "fragment"),
    [
        (anchor_args("doc", 1, "ab" * 31), 400, "sha256 must be 64 hex digits"),
        (anchor_args("doc", 1, "zz" * 32), 400, "sha256 must be 64 hex digits"),
        (anchor_args("doc", 0, sha("x")), 400, "version must be an integer in [1, 4294967295]"),
        (anchor_args("doc", 2**32, sha("x")), 400, "version must be an integer in"),
        ([b"doc", b"-1", sha("x").encode(), b"u", INGESTED_AT.encode()], 400, "decimal integer"),
        (anchor_args("", 1, sha("x")), 400, "document_id must not be empty"),
        (anchor_args("a\x00b", 1, sha("x")), 400, "must not contain U+0000"),
        (anchor_args("doc", 1, sha("x"), ingested_at="2026-11-30"), 400, "RFC 3339"),
        (anchor_args("doc", 1, sha("x"), ingested_at="2026-11-30T01:02:03"), 400, "RFC 3339"),
        (anchor_args("doc", 1, sha("x"), ingested_at="2026-13-30T01:02:03Z"), 400, "not a valid"),
    ],
)
def test_anchor_document_validation(
    chain: MemoryLedger, args: list[bytes], status: int, fragment: str
) -> None:
    error = refused(chain, "AnchorDocument", *args)
    assert error.status == status
    assert fragment in error.message
    assert chain.state == {}


def test_dispatch_errors(chain: MemoryLedger) -> None:
    error = refused(chain, "Nope")
    assert error.status == 400
    assert "unknown function 'Nope'" in error.message
    assert "AnchorDocument" in error.message
    error = refused(chain, "GetAnchor", "doc")
    assert error.message == "GetAnchor takes 2 arguments, got 1"
    error = refused(chain, "History", b"\xff")
    assert "UTF-8" in error.message


def test_anchor_stores_normalised_record_and_emits_event(chain: MemoryLedger) -> None:
    digest = sha("v1").upper()
    out = chain.invoke(
        "AnchorDocument", *anchor_args("doc-1", 1, digest, ingested_at="2026-11-30T03:02:03+02:00")
    )
    assert out["already_anchored"] is False
    record = out["record"]
    assert record == {
        "document_id": "doc-1",
        "version": 1,
        "sha256": digest.lower(),
        "source_url": "https://example.org/doc",
        "ingested_at": "2026-11-30T01:02:03Z",
        "tx_id": "tx0001",
        "anchored_at": "2026-09-21T14:13:30Z",
    }
    assert chain.last is not None
    assert chain.last.event is not None
    name, payload = chain.last.event
    assert name == EVENT_DOCUMENT_ANCHORED
    assert json.loads(payload) == record
    # the record, and the sha256 index entry (Fabric composite keys, NUL-separated)
    assert set(chain.state) == {
        "\x00anchor\x00doc-1\x000000000001\x00",
        f"\x00anchor~sha256\x00{digest.lower()}\x00doc-1\x000000000001\x00",
    }
    assert chain.invoke("GetAnchor", "doc-1", "1") == record


def test_reanchoring_the_same_triple_is_a_no_op(chain: MemoryLedger) -> None:
    first = chain.invoke("AnchorDocument", *anchor_args("doc", 1, sha("v1")))["record"]
    again = chain.invoke(
        "AnchorDocument", *anchor_args("doc", 1, sha("v1").upper(), url="https://other")
    )
    assert again == {"already_anchored": True, "record": first}
    assert chain.last is not None
    assert chain.last.writes == {}
    assert chain.last.event is None


def test_a_different_sha256_for_an_anchored_version_is_refused(chain: MemoryLedger) -> None:
    chain.invoke("AnchorDocument", *anchor_args("doc", 1, sha("v1")))
    error = refused(chain, "AnchorDocument", *anchor_args("doc", 1, sha("tampered")))
    assert error.status == 409
    assert sha("v1") in error.message
    assert sha("tampered") in error.message
    assert "document 'doc' version 1 is already anchored" in error.message
    assert chain.invoke("GetAnchor", "doc", "1")["sha256"] == sha("v1")


def test_history_is_ordered_by_version(chain: MemoryLedger) -> None:
    for version in (10, 2, 1, 11):
        chain.invoke("AnchorDocument", *anchor_args("doc", version, sha(f"v{version}")))
    chain.invoke("AnchorDocument", *anchor_args("doc-2", 1, sha("other")))
    chain.invoke("AnchorDocument", *anchor_args("do", 3, sha("prefix")))
    records = chain.invoke("History", "doc")["records"]
    assert [r["version"] for r in records] == [1, 2, 10, 11]
    assert chain.invoke("History", "unknown") == {"records": []}


def test_find_by_sha256_returns_every_version_oldest_anchor_first(chain: MemoryLedger) -> None:
    same = sha("same text")
    chain.invoke("AnchorDocument", *anchor_args("zeta", 1, same))
    chain.invoke("AnchorDocument", *anchor_args("alpha", 4, same))
    chain.invoke("AnchorDocument", *anchor_args("alpha", 5, sha("else")))
    found = chain.invoke("FindBySha256", same.upper())["records"]
    assert [(r["document_id"], r["version"]) for r in found] == [("zeta", 1), ("alpha", 4)]
    assert chain.invoke("FindBySha256", sha("never")) == {"records": []}
    assert refused(chain, "FindBySha256", "xyz").status == 400


def test_batch_anchors_new_items_and_reports_each(chain: MemoryLedger) -> None:
    chain.invoke("AnchorDocument", *anchor_args("old", 1, sha("old")))
    item = {"source_url": "https://x", "ingested_at": INGESTED_AT}
    batch = [
        {"document_id": "a", "version": 1, "sha256": sha("a1"), **item},
        {"document_id": "old", "version": 1, "sha256": sha("old"), **item},
        {"document_id": "old", "version": 1, "sha256": sha("not old"), **item},
        {"document_id": "a", "version": 1, "sha256": sha("a1"), **item},  # twice in one batch
        {"document_id": "a", "version": 1, "sha256": sha("a1 changed"), **item},
        {"document_id": "b", "version": 3, "sha256": sha("b3"), **item},
    ]
    results = chain.invoke("AnchorDocuments", json.dumps(batch))["results"]
    assert [r["status"] for r in results] == [
        "anchored",
        "already_anchored",
        "conflict",
        "already_anchored",
        "conflict",
        "anchored",
    ]
    assert sha("not old") in results[2]["error"]
    assert sha("old") in results[2]["error"]
    assert chain.last is not None
    assert chain.last.event is not None
    name, payload = chain.last.event
    assert name == EVENT_DOCUMENTS_ANCHORED
    event = json.loads(payload)
    assert event["tx_id"] == chain.last.tx_id
    assert [(r["document_id"], r["version"]) for r in event["records"]] == [("a", 1), ("b", 3)]
    assert chain.invoke("GetAnchor", "a", "1")["sha256"] == sha("a1")


def test_batch_refuses_malformed_items(chain: MemoryLedger) -> None:
    good = {
        "document_id": "a",
        "version": 1,
        "sha256": sha("a"),
        "source_url": "u",
        "ingested_at": INGESTED_AT,
    }
    error = refused(chain, "AnchorDocuments", json.dumps([good, {**good, "sha256": "bad"}]))
    assert error.status == 400
    assert error.message.startswith("AnchorDocuments: item 1: sha256 must be 64 hex digits")
    assert (
        "lacks version"
        in refused(
            chain,
            "AnchorDocuments",
            json.dumps([{k: v for k, v in good.items() if k != "version"}]),
        ).message
    )
    assert "non-empty JSON array" in refused(chain, "AnchorDocuments", "[]").message
    assert "not JSON" in refused(chain, "AnchorDocuments", "{").message
    assert chain.state == {}


def test_audit_is_idempotent_per_request_id(chain: MemoryLedger) -> None:
    out = chain.invoke("AnchorAudit", *audit_args("req-1"))
    assert out["already_anchored"] is False
    record = out["record"]
    assert record["completed_at"] == "2026-11-30T01:00:00.500000Z"
    assert record["cited_chunk_ids"] == ["doc-1:1:0", "doc-1:1:3"]
    assert chain.last is not None
    assert chain.last.event is not None
    assert chain.last.event[0] == EVENT_AUDIT_ANCHORED
    assert json.loads(chain.last.event[1]) == record

    again = chain.invoke("AnchorAudit", *audit_args("req-1", completed_at="2026-11-30T01:00:00.5Z"))
    assert again == {"already_anchored": True, "record": record}
    assert chain.last.writes == {}
    assert chain.last.event is None

    error = refused(chain, "AnchorAudit", *audit_args("req-1", model="other", tenant_id="t2"))
    assert error.status == 409
    assert "differs in model, tenant_id" in error.message
    assert chain.invoke("GetAudit", "req-1") == record
    missing = refused(chain, "GetAudit", "req-2")
    assert missing.status == 404


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"prompt_sha256": "x"}, "prompt_sha256 must be 64 hex digits"),
        ({"answer_sha256": ""}, "answer_sha256 must be 64 hex digits"),
        ({"model": ""}, "model must not be empty"),
        ({"cited_chunk_ids": [1]}, "JSON array of non-empty strings"),
        ({"completed_at": "now"}, "completed_at must be an RFC 3339"),
    ],
)
def test_audit_validation(chain: MemoryLedger, overrides: dict[str, object], fragment: str) -> None:
    error = refused(chain, "AnchorAudit", *audit_args("req", **overrides))
    assert error.status == 400
    assert fragment in error.message


def test_composite_keys_match_fabric() -> None:
    assert composite_key("anchor", "doc", "0000000001") == "\x00anchor\x00doc\x000000000001\x00"
    start, end = composite_range("anchor", "doc")
    assert (start, end) == ("\x00anchor\x00doc\x00", "\x00anchor\x00doc\x00\U0010ffff")
    assert AnchoringContract().name == "anchoring"

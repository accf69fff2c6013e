"""The ledger service over real gRPC: every RPC's happy path and its validation errors,
commit status and event streaming with checkpoints on the dev ledger; the anchoring
behaviour (idempotence, conflicts, verify, history, audit, concurrent anchors) on both
backends (``any_service``: the dev ledger and Fabric through a TestPeer)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from _service_support import Harness, failure_of, sha, violations_of
from google.protobuf import timestamp_pb2

from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.auth import DevTokenIssuer

pytestmark = pytest.mark.integration

INGESTED = timestamp_pb2.Timestamp(seconds=1_790_000_000)


def anchor_request(doc: str, version: int, digest: str) -> ledger_pb2.AnchorDocumentRequest:
    return ledger_pb2.AnchorDocumentRequest(
        document_id=doc,
        version=version,
        sha256=digest,
        source_url=f"https://example.org/{doc}",
        ingested_at=INGESTED,
    )


def audit_record(request_id: str = "cmpl-1", **overrides: Any) -> ledger_pb2.AuditRecord:
    values: dict[str, Any] = {
        "request_id": request_id,
        "prompt_sha256": sha("prompt"),
        "answer_sha256": sha("answer"),
        "model": "extractive-v1",
        "tenant_id": "acme",
        "api_key_id": "key-1",
        "cited_chunk_ids": ["doc-1:1:0"],
        "completed_at": timestamp_pb2.Timestamp(seconds=1_790_000_100),
    }
    values.update(overrides)
    return ledger_pb2.AuditRecord(**values)


async def expect_error(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def test_anchor_document_is_idempotent_and_refuses_another_checksum(
    any_service: Harness,
) -> None:
    service = any_service
    first = await service.call("AnchorDocument", anchor_request("doc-1", 1, sha("v1")))
    assert not first.already_anchored
    record = first.record
    assert (record.document_id, record.version, record.sha256) == ("doc-1", 1, sha("v1"))
    assert record.ingested_at == INGESTED
    anchor = record.anchor
    assert len(anchor.tx_id) == 64
    assert anchor.block_number >= 1
    assert anchor.channel == "ledgerlens"
    assert anchor.committed_at.seconds > 0

    again = await service.call("AnchorDocument", anchor_request("doc-1", 1, sha("v1").upper()))
    assert again.already_anchored
    assert again.record.anchor == anchor  # the existing anchor, nothing submitted

    error = await expect_error(
        service.call("AnchorDocument", anchor_request("doc-1", 1, sha("other"))),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert sha("v1") in (error.details() or "")
    failure = failure_of(error)
    assert failure is not None
    assert failure.phase == ledger_pb2.TRANSACTION_PHASE_ENDORSE
    assert failure.endorsers  # every refusing peer, with the contract's message
    assert all(sha("v1") in e.message for e in failure.endorsers)


async def test_verify_document_with_and_without_document_id(any_service: Harness) -> None:
    service = any_service
    await service.call("AnchorDocument", anchor_request("doc-a", 1, sha("shared")))
    await service.call("AnchorDocument", anchor_request("doc-b", 1, sha("shared")))
    await service.call("AnchorDocument", anchor_request("doc-a", 2, sha("a2")))

    anywhere = await service.call(
        "VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256=sha("shared"))
    )
    assert anywhere.anchored
    assert sorted(r.document_id for r in anywhere.records) == ["doc-a", "doc-b"]
    assert all(r.anchor.block_number >= 1 for r in anywhere.records)

    only_b = await service.call(
        "VerifyDocument",
        ledger_pb2.VerifyDocumentRequest(sha256=sha("shared"), document_id="doc-b"),
    )
    assert [r.document_id for r in only_b.records] == ["doc-b"]

    exact = await service.call(
        "VerifyDocument",
        ledger_pb2.VerifyDocumentRequest(sha256=sha("a2"), document_id="doc-a", version=2),
    )
    assert exact.anchored
    assert exact.records[0].version == 2
    wrong_version = await service.call(
        "VerifyDocument",
        ledger_pb2.VerifyDocumentRequest(sha256=sha("a2"), document_id="doc-a", version=1),
    )
    assert not wrong_version.anchored
    assert not wrong_version.records

    unknown = await service.call(
        "VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256=sha("nope"))
    )
    assert not unknown.anchored
    assert not unknown.records

    history = await service.call(
        "GetAnchorHistory", ledger_pb2.GetAnchorHistoryRequest(document_id="doc-a")
    )
    assert [r.version for r in history.records] == [1, 2]
    empty = await service.call(
        "GetAnchorHistory", ledger_pb2.GetAnchorHistoryRequest(document_id="ghost")
    )
    assert not empty.records


@pytest.mark.parametrize(
    ("method", "request_", "fields"),
    [
        ("AnchorDocument", anchor_request("d", 1, "abc"), ["sha256"]),
        ("AnchorDocument", anchor_request("d", 0, sha("x")), ["version"]),
        ("AnchorDocument", anchor_request("", 1, sha("x")), ["document_id"]),
        ("VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256="xyz"), ["sha256"]),
        ("GetAnchorHistory", ledger_pb2.GetAnchorHistoryRequest(), ["document_id"]),
        ("GetAuditRecord", ledger_pb2.GetAuditRecordRequest(), ["request_id"]),
        ("AnchorAudit", ledger_pb2.AnchorAuditRequest(), ["record"]),
        (
            "AnchorAudit",
            ledger_pb2.AnchorAuditRequest(
                record=ledger_pb2.AuditRecord(request_id="r", prompt_sha256="1", model="m")
            ),
            [
                "record.prompt_sha256",
                "record.answer_sha256",
                "record.tenant_id",
                "record.api_key_id",
                "record.completed_at",
            ],
        ),
        (
            "SubmitTransaction",
            ledger_pb2.SubmitTransactionRequest(function="History", args=[b"x"] * 65),
            ["args"],
        ),
        (
            "SubmitTransaction",
            ledger_pb2.SubmitTransactionRequest(function="", channel="elsewhere"),
            ["channel", "function"],
        ),
        (
            "EvaluateTransaction",
            ledger_pb2.EvaluateTransactionRequest(function="History", chaincode="nope"),
            ["chaincode"],
        ),
        (
            "EvaluateTransaction",
            ledger_pb2.EvaluateTransactionRequest(
                function="History", transient={str(i): b"" for i in range(65)}
            ),
            ["transient"],
        ),
        ("GetCommitStatus", ledger_pb2.GetCommitStatusRequest(tx_id=""), ["tx_id"]),
    ],
)
async def test_invalid_requests_name_their_fields(
    service: Harness, method: str, request_: Any, fields: list[str]
) -> None:
    error = await expect_error(service.call(method, request_), grpc.StatusCode.INVALID_ARGUMENT)
    assert violations_of(error) == fields


async def test_anchor_audit_and_get_audit_record(any_service: Harness) -> None:
    service = any_service
    first = await service.call("AnchorAudit", ledger_pb2.AnchorAuditRequest(record=audit_record()))
    assert not first.already_anchored
    assert first.anchor.block_number >= 1
    again = await service.call("AnchorAudit", ledger_pb2.AnchorAuditRequest(record=audit_record()))
    assert again.already_anchored
    assert again.anchor == first.anchor

    got = await service.call(
        "GetAuditRecord", ledger_pb2.GetAuditRecordRequest(request_id="cmpl-1")
    )
    assert got.record == audit_record()
    assert got.anchor == first.anchor

    await expect_error(
        service.call(
            "AnchorAudit",
            ledger_pb2.AnchorAuditRequest(record=audit_record(model="another-model")),
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_error(
        service.call("GetAuditRecord", ledger_pb2.GetAuditRecordRequest(request_id="ghost")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_submit_evaluate_and_commit_status(service: Harness) -> None:
    args = [b"doc-s", b"1", sha("s").encode(), b"https://example.org/s", b"2026-11-30T00:00:00Z"]
    submitted = await service.call(
        "SubmitTransaction",
        ledger_pb2.SubmitTransactionRequest(function="AnchorDocument", args=args),
    )
    assert submitted.status == ledger_pb2.TRANSACTION_STATUS_VALID
    assert submitted.block_number >= 1
    assert submitted.committed_at.seconds > 0
    assert json.loads(submitted.result)["record"]["tx_id"] == submitted.tx_id

    evaluated = await service.call(
        "EvaluateTransaction",
        ledger_pb2.EvaluateTransactionRequest(function="GetAnchor", args=[b"doc-s", b"1"]),
    )
    assert json.loads(evaluated.result)["sha256"] == sha("s")

    status = await service.call(
        "GetCommitStatus", ledger_pb2.GetCommitStatusRequest(tx_id=submitted.tx_id)
    )
    assert status.status == ledger_pb2.TRANSACTION_STATUS_VALID
    assert status.validation_code == "VALID"
    assert status.block_number == submitted.block_number

    pending = await service.call(
        "SubmitTransaction",
        ledger_pb2.SubmitTransactionRequest(
            function="AnchorDocument",
            args=[b"doc-t", b"1", sha("t").encode(), b"", b"2026-11-30T00:00:00Z"],
            async_commit=True,
        ),
    )
    assert pending.status == ledger_pb2.TRANSACTION_STATUS_PENDING
    assert pending.block_number == 0
    waited = await service.call(
        "GetCommitStatus",
        ledger_pb2.GetCommitStatusRequest(tx_id=pending.tx_id, wait=True),
        timeout=10,
    )
    assert waited.status == ledger_pb2.TRANSACTION_STATUS_VALID
    assert waited.block_number >= 1

    await expect_error(
        service.call("GetCommitStatus", ledger_pb2.GetCommitStatusRequest(tx_id="f" * 64)),
        grpc.StatusCode.NOT_FOUND,
    )
    # the contract's own refusal (400) over the generic RPC, with the endorser named
    error = await expect_error(
        service.call(
            "SubmitTransaction",
            ledger_pb2.SubmitTransactionRequest(function="GetAnchor", args=[b"doc-s", b"zero"]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    failure = failure_of(error)
    assert failure is not None
    assert failure.endorsers[0].msp_id == "DevLedgerMSP"
    assert "version" in failure.endorsers[0].message


async def test_stream_events_resumes_exactly_after_a_checkpoint(service: Harness) -> None:
    for i in range(3):
        await service.call("AnchorDocument", anchor_request(f"doc-{i}", 1, sha(f"e{i}")))

    async def take(request: ledger_pb2.StreamEventsRequest, count: int) -> list[Any]:
        call = service.stub.StreamEvents(request, metadata=service.metadata)
        items = []
        async with asyncio.timeout(10):
            async for item in call:
                items.append(item)
                if len(items) == count:
                    break
        call.cancel()
        return items

    everything = await take(ledger_pb2.StreamEventsRequest(start_block=0), 3)
    assert [e.event.event_name for e in everything] == ["DocumentAnchored"] * 3
    assert [e.checkpoint.tx_id for e in everything] == [e.event.tx_id for e in everything]
    assert all(e.event.committed_at.seconds > 0 for e in everything)

    resumed = await take(ledger_pb2.StreamEventsRequest(after=everything[0].checkpoint), 2)
    assert [e.event.tx_id for e in resumed] == [e.event.tx_id for e in everything[1:]]

    call = service.stub.StreamEvents(
        ledger_pb2.StreamEventsRequest(start_block=10_000), metadata=service.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_ops_app_is_ready_and_exposes_ledger_metrics(service: Harness) -> None:
    await service.call("AnchorDocument", anchor_request("doc-m", 1, sha("m")))
    async with httpx.AsyncClient(base_url=service.running.http_url) as client:
        ready = await client.get("/readyz")
        exposed = (await client.get("/metrics")).text
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"database", "nats", "ledger", "follower"}
    assert (
        'ledgerlens_ledger_transactions_total{backend="dev",function="AnchorDocument",outcome="committed"}'
        in exposed
    )
    assert "ledgerlens_ledger_commit_duration_seconds_bucket" in exposed


async def test_runs_on_postgresql(start_ledger: Callable[..., Any], pg_schema_url: str) -> None:
    async with start_ledger(database_url=pg_schema_url) as service:
        first = await service.call("AnchorDocument", anchor_request("pg-doc", 1, sha("pg")))
        found = await service.call(
            "VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256=sha("pg"))
        )
        assert found.records[0].anchor == first.record.anchor


async def test_concurrent_anchors_of_one_version_all_succeed_once(any_service: Harness) -> None:
    """They endorse against the same state, so all but one are invalidated with
    MVCC_READ_CONFLICT; the bounded retry re-endorses and finds the anchor."""
    service = any_service
    request = anchor_request("hot-doc", 1, sha("hot"))
    results = await asyncio.gather(*(service.call("AnchorDocument", request) for _ in range(8)))
    assert sum(not r.already_anchored for r in results) == 1
    assert len({r.record.anchor.tx_id for r in results}) == 1


async def test_scopes_come_from_the_contract(
    service: Harness, token_issuer: DevTokenIssuer
) -> None:
    reader = token_issuer.issue("reader", ["ledger:read"], ttl=600)
    metadata = (("authorization", f"Bearer {reader}"),)
    await service.stub.VerifyDocument(
        ledger_pb2.VerifyDocumentRequest(sha256=sha("x")), metadata=metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.AnchorDocument(anchor_request("d", 1, sha("x")), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.VerifyDocument(ledger_pb2.VerifyDocumentRequest(sha256=sha("x")))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

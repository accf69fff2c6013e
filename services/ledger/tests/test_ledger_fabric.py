"""The service on the Fabric backend, against ``ledgerlens.fabric.testing.TestPeer``
hosting the same ``AnchoringContract``: the anchoring flow, a refused endorsement with
the refusing peer in the TransactionFailure, a commit timeout naming its phase, an
unreachable peer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from _service_support import ANCHOR_SUBJECT, failure_of, published, sha
from google.protobuf import timestamp_pb2

from ledgerlens.events.v1 import events_pb2
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.events import EventBus
from ledgerlens.runtime.testing import EventNames, eventually

pytestmark = pytest.mark.integration

AT = timestamp_pb2.Timestamp(seconds=1_790_000_000)


def anchor(doc: str, digest: str, version: int = 1) -> ledger_pb2.AnchorDocumentRequest:
    return ledger_pb2.AnchorDocumentRequest(
        document_id=doc, version=version, sha256=digest, source_url="https://x", ingested_at=AT
    )


async def test_anchoring_flow_on_fabric(
    fabric_service: Callable[..., Any], event_bus: EventBus, event_names: EventNames
) -> None:
    async with fabric_service() as (_peer, service):
        first = await service.call("AnchorDocument", anchor("fab-doc", sha("fab")))
        assert not first.already_anchored
        assert first.record.anchor.block_number >= 1
        assert len(first.record.anchor.tx_id) == 64
        # Fabric reports no commit time: the transaction's own timestamp stands in
        assert first.record.anchor.committed_at.seconds > 0
        again = await service.call("AnchorDocument", anchor("fab-doc", sha("fab")))
        assert again.already_anchored
        assert again.record.anchor == first.record.anchor
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.call("AnchorDocument", anchor("fab-doc", sha("other")))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        failure = failure_of(caught.value)
        assert failure is not None
        assert sorted(e.msp_id for e in failure.endorsers) == ["Org1MSP", "Org2MSP"]

        found = await service.call(
            "VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256=sha("fab"))
        )
        assert found.anchored
        assert found.records[0].anchor == first.record.anchor
        status = await service.call(
            "GetCommitStatus", ledger_pb2.GetCommitStatusRequest(tx_id=first.record.anchor.tx_id)
        )
        assert status.status == ledger_pb2.TRANSACTION_STATUS_VALID
        assert status.block_number == first.record.anchor.block_number

        async def announced() -> bool:
            got = await published(
                event_bus, event_names, ANCHOR_SUBJECT, events_pb2.AnchorCommitted
            )
            return [a.document_id for a in got] == ["fab-doc"]

        await eventually(announced, within=15)


async def test_refused_endorsement_names_the_peer(fabric_service: Callable[..., Any]) -> None:
    async with fabric_service() as (peer, service):
        peer.refuse_endorsement("Org2MSP", "endorsement policy says no")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.call("AnchorDocument", anchor("refused", sha("r")))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        failure = failure_of(caught.value)
        assert failure is not None
        assert failure.phase == ledger_pb2.TRANSACTION_PHASE_ENDORSE
        assert len(failure.tx_id) == 64
        assert [(e.address, e.msp_id, e.message) for e in failure.endorsers] == [
            (peer.organization("Org2MSP").address, "Org2MSP", "endorsement policy says no")
        ]
        assert "Org2MSP" in (caught.value.details() or "")
        peer.allow_endorsement("Org2MSP")
        ok = await service.call("AnchorDocument", anchor("refused", sha("r")))
        assert not ok.already_anchored


async def test_commit_timeout_names_the_phase(fabric_service: Callable[..., Any]) -> None:
    async with fabric_service(commit_timeout_seconds=0.3) as (peer, service):
        peer.commit_delay = 1.5
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.call("AnchorDocument", anchor("slow", sha("slow")))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        failure = failure_of(caught.value)
        assert failure is not None
        assert failure.phase == ledger_pb2.TRANSACTION_PHASE_COMMIT
        assert "commit" in (caught.value.details() or "")
        # it still commits: the status can be asked for again
        status = await service.call(
            "GetCommitStatus",
            ledger_pb2.GetCommitStatusRequest(tx_id=failure.tx_id, wait=True),
            timeout=10,
        )
        assert status.status == ledger_pb2.TRANSACTION_STATUS_VALID


async def test_unreachable_peer_is_unavailable(fabric_service: Callable[..., Any]) -> None:
    async with fabric_service(endorse_timeout_seconds=2.0) as (peer, service):
        async with httpx.AsyncClient(base_url=service.running.http_url) as client:
            assert (await client.get("/readyz")).status_code == 200
            await peer.stop()
            not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503
        assert not not_ready.json()["checks"]["ledger"]["ok"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.call("AnchorDocument", anchor("away", sha("away")))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_conflicts_are_retried_then_reported(fabric_service: Callable[..., Any]) -> None:
    async with fabric_service(max_attempts=2) as (peer, service):
        peer.force_mvcc_conflicts(1)
        retried = await service.call("AnchorDocument", anchor("mvcc-1", sha("m1")))
        assert not retried.already_anchored
        peer.force_mvcc_conflicts(2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.call("AnchorDocument", anchor("mvcc-2", sha("m2")))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        failure = failure_of(caught.value)
        assert failure is not None
        assert failure.phase == ledger_pb2.TRANSACTION_PHASE_COMMIT
        assert failure.validation_code == "MVCC_READ_CONFLICT"
        assert failure.attempts == 2


async def test_async_submit_and_event_stream_on_fabric(fabric_service: Callable[..., Any]) -> None:
    async with fabric_service() as (peer, service):
        peer.commit_delay = 0.3
        pending = await service.call(
            "SubmitTransaction",
            ledger_pb2.SubmitTransactionRequest(
                function="AnchorDocument",
                args=[b"async-doc", b"1", sha("async").encode(), b"", b"2026-11-30T00:00:00Z"],
                async_commit=True,
            ),
        )
        assert pending.status == ledger_pb2.TRANSACTION_STATUS_PENDING
        status = await service.call(
            "GetCommitStatus", ledger_pb2.GetCommitStatusRequest(tx_id=pending.tx_id)
        )
        assert status.status == ledger_pb2.TRANSACTION_STATUS_PENDING
        waited = await service.call(
            "GetCommitStatus",
            ledger_pb2.GetCommitStatusRequest(tx_id=pending.tx_id, wait=True),
            timeout=10,
        )
        assert waited.status == ledger_pb2.TRANSACTION_STATUS_VALID
        peer.commit_delay = 0.0
        await service.call("AnchorDocument", anchor("second", sha("second")))

        call = service.stub.StreamEvents(
            ledger_pb2.StreamEventsRequest(start_block=0), metadata=service.metadata
        )
        first = await anext(aiter(call))
        call.cancel()
        assert first.event.tx_id == pending.tx_id
        call = service.stub.StreamEvents(
            ledger_pb2.StreamEventsRequest(after=first.checkpoint), metadata=service.metadata
        )
        resumed = await anext(aiter(call))
        call.cancel()
        assert resumed.event.event_name == "DocumentAnchored"
        assert b"second" in resumed.event.payload

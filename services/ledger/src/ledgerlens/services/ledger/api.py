"""The ledger gRPC servicer: proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc.aio
from google.protobuf import timestamp_pb2

from ledgerlens.common.v1 import common_pb2
from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledgerlens.runtime.errors import NotFound
from ledgerlens.services.ledger.anchoring import (
    Anchored,
    Anchoring,
    AuditAnchored,
    Location,
    parse_time,
)
from ledgerlens.services.ledger.backend import CommitInfo, EventPosition, LedgerBackend
from ledgerlens.services.ledger.requests import (
    MAX_EVENT_NAMES,
    Violations,
    anchor_request,
    audit_request,
    check_invocation,
)

__all__ = ["LedgerApi"]

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS = {
    "pending": ledger_pb2.TRANSACTION_STATUS_PENDING,
    "valid": ledger_pb2.TRANSACTION_STATUS_VALID,
    "invalid": ledger_pb2.TRANSACTION_STATUS_INVALID,
}


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def _anchor(location: Location) -> common_pb2.LedgerAnchor:
    return common_pb2.LedgerAnchor(
        tx_id=location.tx_id,
        block_number=location.block_number,
        committed_at=_timestamp(location.committed_at),
        channel=location.channel,
    )


def _anchor_record(anchored: Anchored) -> ledger_pb2.AnchorRecord:
    r = anchored.record
    return ledger_pb2.AnchorRecord(
        document_id=r.document_id,
        version=r.version,
        sha256=r.sha256,
        source_url=r.source_url,
        ingested_at=_timestamp(parse_time(r.ingested_at)),
        anchor=_anchor(anchored.location),
    )


def _audit_record(anchored: AuditAnchored) -> ledger_pb2.AuditRecord:
    r = anchored.record
    return ledger_pb2.AuditRecord(
        request_id=r.request_id,
        prompt_sha256=r.prompt_sha256,
        answer_sha256=r.answer_sha256,
        model=r.model,
        tenant_id=r.tenant_id,
        api_key_id=r.api_key_id,
        cited_chunk_ids=list(r.cited_chunk_ids),
        completed_at=_timestamp(parse_time(r.completed_at)),
    )


def _remaining(context: Context) -> float | None:
    remaining = context.time_remaining()
    return max(remaining - 0.05, 0.01) if remaining is not None else None


class LedgerApi(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, backend: LedgerBackend, anchoring: Anchoring, chaincode: str) -> None:
        self._backend = backend
        self._anchoring = anchoring
        self._chaincode = chaincode

    # -- request checks shared by the generic RPCs ------------------------------------------

    def _target(self, channel: str, chaincode: str, violations: Violations) -> str:
        if channel and channel != self._backend.channel:
            violations.add(
                "channel",
                f"unknown channel {channel!r}; this service serves {self._backend.channel!r}",
            )
        name = chaincode or self._chaincode
        if not self._backend.has_chaincode(name):
            violations.add("chaincode", f"unknown chaincode {name!r}")
        return name

    # -- transactions ----------------------------------------------------------------------

    async def SubmitTransaction(
        self, request: ledger_pb2.SubmitTransactionRequest, context: Context
    ) -> ledger_pb2.SubmitTransactionResponse:
        v = Violations()
        chaincode = self._target(request.channel, request.chaincode, v)
        args = check_invocation(request.function, request.args, request.transient, v)
        for index, org in enumerate(request.endorsing_organizations):
            if not org:
                v.add(f"endorsing_organizations[{index}]", "must not be empty")
        v.raise_if_any("SubmitTransactionRequest")
        submitted = await self._backend.submit(
            chaincode,
            request.function,
            args,
            transient=dict(request.transient),
            endorsing_organizations=list(request.endorsing_organizations),
            wait=not request.async_commit,
        )
        response = ledger_pb2.SubmitTransactionResponse(
            tx_id=submitted.tx_id,
            result=submitted.result,
            status=_STATUS.get(submitted.status.state, ledger_pb2.TRANSACTION_STATUS_PENDING),
            block_number=submitted.status.block_number or 0,
        )
        if submitted.status.committed_at is not None:
            response.committed_at.CopyFrom(_timestamp(submitted.status.committed_at))
        return response

    async def EvaluateTransaction(
        self, request: ledger_pb2.EvaluateTransactionRequest, context: Context
    ) -> ledger_pb2.EvaluateTransactionResponse:
        v = Violations()
        chaincode = self._target(request.channel, request.chaincode, v)
        args = check_invocation(request.function, request.args, request.transient, v)
        v.raise_if_any("EvaluateTransactionRequest")
        result = await self._backend.evaluate(
            chaincode, request.function, args, transient=dict(request.transient)
        )
        return ledger_pb2.EvaluateTransactionResponse(result=result)

    async def GetCommitStatus(
        self, request: ledger_pb2.GetCommitStatusRequest, context: Context
    ) -> ledger_pb2.GetCommitStatusResponse:
        v = Violations()
        self._target(request.channel, "", v)
        v.tx_id(request.tx_id)
        v.raise_if_any("GetCommitStatusRequest")
        info: CommitInfo = await self._backend.commit_status(request.tx_id)
        if request.wait and info.state in ("pending", "unknown"):
            info = await self._backend.commit_status(
                request.tx_id, wait=True, wait_seconds=_remaining(context)
            )
        if info.state == "unknown":
            raise NotFound(
                f"the ledger has never seen transaction {request.tx_id}",
                resource_type="transaction",
                resource_name=request.tx_id,
            )
        response = ledger_pb2.GetCommitStatusResponse(
            tx_id=request.tx_id,
            status=_STATUS[info.state],
            validation_code=info.validation_code,
            block_number=info.block_number or 0,
        )
        if info.committed_at is not None:
            response.committed_at.CopyFrom(_timestamp(info.committed_at))
        return response

    async def StreamEvents(
        self, request: ledger_pb2.StreamEventsRequest, context: Context
    ) -> AsyncIterator[ledger_pb2.StreamEventsResponse]:
        v = Violations()
        chaincode = self._target(request.channel, request.chaincode, v)
        if len(request.event_names) > MAX_EVENT_NAMES:
            v.add("event_names", f"at most {MAX_EVENT_NAMES} names")
        start = request.WhichOneof("start")
        after: EventPosition | None = None
        if start == "after":
            if request.after.tx_id:
                v.tx_id(request.after.tx_id, "after.tx_id")
            after = EventPosition(request.after.block_number, request.after.tx_id)
        v.raise_if_any("StreamEventsRequest")
        events = self._backend.events(
            chaincode,
            start_block=request.start_block if start == "start_block" else None,
            after=after,
            event_names=list(request.event_names),
        )
        async for event in events:
            item = ledger_pb2.ChaincodeEvent(
                block_number=event.block_number,
                tx_id=event.tx_id,
                chaincode=event.chaincode,
                event_name=event.name,
                payload=event.payload,
            )
            if event.committed_at is not None:
                item.committed_at.CopyFrom(_timestamp(event.committed_at))
            yield ledger_pb2.StreamEventsResponse(
                event=item,
                checkpoint=ledger_pb2.Checkpoint(
                    block_number=event.block_number, tx_id=event.tx_id
                ),
            )

    # -- anchoring -------------------------------------------------------------------------

    async def AnchorDocument(
        self, request: ledger_pb2.AnchorDocumentRequest, context: Context
    ) -> ledger_pb2.AnchorDocumentResponse:
        anchored = await self._anchoring.anchor_document(anchor_request(request))
        return ledger_pb2.AnchorDocumentResponse(
            record=_anchor_record(anchored), already_anchored=anchored.already_anchored
        )

    async def VerifyDocument(
        self, request: ledger_pb2.VerifyDocumentRequest, context: Context
    ) -> ledger_pb2.VerifyDocumentResponse:
        v = Violations()
        sha256 = v.sha256(request.sha256, "sha256")
        v.identifier(request.document_id, "document_id", required=False)
        v.raise_if_any("VerifyDocumentRequest")
        found = await self._anchoring.verify(sha256, request.document_id, request.version)
        return ledger_pb2.VerifyDocumentResponse(
            anchored=bool(found), records=[_anchor_record(a) for a in found]
        )

    async def GetAnchorHistory(
        self, request: ledger_pb2.GetAnchorHistoryRequest, context: Context
    ) -> ledger_pb2.GetAnchorHistoryResponse:
        v = Violations()
        v.identifier(request.document_id, "document_id")
        v.raise_if_any("GetAnchorHistoryRequest")
        found = await self._anchoring.history(request.document_id)
        return ledger_pb2.GetAnchorHistoryResponse(records=[_anchor_record(a) for a in found])

    async def AnchorAudit(
        self, request: ledger_pb2.AnchorAuditRequest, context: Context
    ) -> ledger_pb2.AnchorAuditResponse:
        anchored = await self._anchoring.anchor_audit(audit_request(request))
        return ledger_pb2.AnchorAuditResponse(
            anchor=_anchor(anchored.location), already_anchored=anchored.already_anchored
        )

    async def GetAuditRecord(
        self, request: ledger_pb2.GetAuditRecordRequest, context: Context
    ) -> ledger_pb2.GetAuditRecordResponse:
        v = Violations()
        v.identifier(request.request_id, "request_id")
        v.raise_if_any("GetAuditRecordRequest")
        anchored = await self._anchoring.get_audit(request.request_id)
        return ledger_pb2.GetAuditRecordResponse(
            record=_audit_record(anchored), anchor=_anchor(anchored.location)
        )

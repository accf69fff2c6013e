"""Support of the ledger service tests: a harness around a running service, and
helpers to read what it published and the status details of its errors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import nats.errors
from google.protobuf.message import Message
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from ledgerlens.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from ledgerlens.runtime.events import EventBus, Subjects
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.ledger.app import RunningLedger
from ledgerlens.services.ledger.settings import Settings

M = TypeVar("M", bound=Message)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Harness:
    running: RunningLedger
    stub: ledger_pb2_grpc.LedgerServiceStub
    metadata: tuple[tuple[str, str], ...]
    names: EventNames
    settings: Settings

    async def call(self, method: str, request: Any, **kwargs: Any) -> Any:
        return await getattr(self.stub, method)(request, metadata=self.metadata, **kwargs)


async def published(
    bus: EventBus, names: EventNames, subject: str, message_type: type[M], within: float = 0.5
) -> list[M]:
    """Every message stored on the test's version of ``subject`` (an ephemeral consumer
    reads the stream from its start)."""
    stream = names.stream_name("LEDGER")
    sub = await bus.jetstream.pull_subscribe(names.subject(subject), stream=stream)
    found: list[M] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=within)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for msg in msgs:
                found.append(message_type.FromString(msg.data))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return found


ANCHOR_SUBJECT = Subjects.LEDGER_ANCHOR_COMMITTED
AUDIT_SUBJECT = Subjects.LEDGER_AUDIT_COMMITTED


def failure_of(error: grpc.aio.AioRpcError) -> ledger_pb2.TransactionFailure | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(ledger_pb2.TransactionFailure.DESCRIPTOR):
            failure = ledger_pb2.TransactionFailure()
            detail.Unpack(failure)
            return failure
    return None


def violations_of(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields

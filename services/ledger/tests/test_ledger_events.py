"""Events in and out with real NATS: consumed events end up anchored, and every anchored
record is published exactly once — across a stopped service, restarts, and anchors made
through the RPC."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from _service_support import ANCHOR_SUBJECT, AUDIT_SUBJECT, Harness, published, sha
from google.protobuf import timestamp_pb2
from sqlalchemy import func, select

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.events import EventBus, Subjects
from ledgerlens.runtime.testing import EventNames, eventually
from ledgerlens.services.ledger.schema import OUTBOX, CheckpointRow

pytestmark = pytest.mark.integration

AT = timestamp_pb2.Timestamp(seconds=1_790_000_000)


def ingested(doc: str, version: int, digest: str) -> events_pb2.DocumentIngested:
    return events_pb2.DocumentIngested(
        provenance=common_pb2.Provenance(
            document_id=doc,
            version=version,
            source_url=f"https://example.org/{doc}",
            sha256=digest,
            ingested_at=AT,
        ),
        chunk_count=3,
        occurred_at=AT,
    )


async def publish(bus: EventBus, names: EventNames, subject: str, event: Any, msg_id: str) -> None:
    await bus.publish(names.subject(subject), event, msg_id=msg_id)


async def ensure_streams(bus: EventBus, names: EventNames) -> None:
    for spec in names.platform_streams().values():
        await bus.ensure_stream(spec)


async def verified(service: Harness, digest: str) -> bool:
    response = await service.call("VerifyDocument", ledger_pb2.VerifyDocumentRequest(sha256=digest))
    return bool(response.anchored)


async def anchors_published(bus: EventBus, names: EventNames) -> list[events_pb2.AnchorCommitted]:
    return await published(bus, names, ANCHOR_SUBJECT, events_pb2.AnchorCommitted)


async def test_ingested_documents_are_anchored_and_announced_once(
    service: Harness, event_bus: EventBus, event_names: EventNames
) -> None:
    docs = [(f"doc-{i}", sha(f"content {i}")) for i in range(5)]
    for doc, digest in docs:
        await publish(
            event_bus,
            event_names,
            Subjects.INGESTION_DOCUMENT_INGESTED,
            ingested(doc, 1, digest),
            f"di:{doc}",
        )
    for _, digest in docs:
        await eventually(lambda d=digest: verified(service, d), within=15)  # type: ignore[misc]

    async def all_announced() -> bool:
        return len(await anchors_published(event_bus, event_names)) >= len(docs)

    await eventually(all_announced, within=15)
    await asyncio.sleep(0.5)
    announced = await anchors_published(event_bus, event_names)
    assert sorted(a.document_id for a in announced) == [doc for doc, _ in docs]
    by_doc = {a.document_id: a for a in announced}
    for doc, digest in docs:
        anchor = by_doc[doc]
        assert anchor.sha256 == digest
        assert anchor.version == 1
        assert anchor.anchor.block_number >= 1
        assert anchor.anchor.channel == "ledgerlens"
    # batched: fewer transactions than documents (they arrived together)
    assert len({a.anchor.tx_id for a in announced}) < len(docs)


async def test_events_published_while_the_service_was_down_are_anchored_once(
    start_ledger: Callable[..., Any], event_bus: EventBus, event_names: EventNames
) -> None:
    async with start_ledger():
        pass  # declares the durable consumers, then the service is gone
    await publish(
        event_bus,
        event_names,
        Subjects.INGESTION_DOCUMENT_INGESTED,
        ingested("late-doc", 1, sha("late")),
        "di:late",
    )
    # the same event published twice (outside the duplicate window's help: another id)
    await publish(
        event_bus,
        event_names,
        Subjects.INGESTION_DOCUMENT_INGESTED,
        ingested("late-doc", 1, sha("late")),
        "di:late:again",
    )
    async with start_ledger() as service:
        await eventually(lambda: verified(service, sha("late")), within=15)

        async def announced() -> bool:
            return len(await anchors_published(event_bus, event_names)) >= 1

        await eventually(announced, within=15)
        await asyncio.sleep(1.0)
        anchors = await anchors_published(event_bus, event_names)
        assert [(a.document_id, a.sha256) for a in anchors] == [("late-doc", sha("late"))]


async def test_a_restart_does_not_republish(
    start_ledger: Callable[..., Any],
    event_bus: EventBus,
    event_names: EventNames,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a short duplicate window, so JetStream's dedupe cannot hide a republish
    short = {
        name: dataclasses.replace(spec, duplicate_window_seconds=0.5)
        for name, spec in event_names.platform_streams().items()
    }
    monkeypatch.setattr(EventNames, "platform_streams", lambda self: short)
    request = ledger_pb2.AnchorDocumentRequest(
        document_id="rpc-doc", version=1, sha256=sha("rpc"), ingested_at=AT
    )
    audit = ledger_pb2.AuditRecord(
        request_id="cmpl-9",
        prompt_sha256=sha("p"),
        answer_sha256=sha("a"),
        model="m",
        tenant_id="t",
        api_key_id="k",
        completed_at=AT,
    )
    async with start_ledger() as service:
        first = await service.call("AnchorDocument", request)
        await service.call("AnchorAudit", ledger_pb2.AnchorAuditRequest(record=audit))

        async def both() -> bool:
            return len(await anchors_published(event_bus, event_names)) == 1 and (
                len(
                    await published(
                        event_bus, event_names, AUDIT_SUBJECT, events_pb2.AuditCommitted
                    )
                )
                == 1
            )

        await eventually(both, within=15)
    await asyncio.sleep(1.0)  # past the duplicate window
    async with start_ledger() as service:
        again = await service.call("AnchorDocument", request)
        assert again.already_anchored
        assert again.record.anchor == first.record.anchor
        await service.call(
            "AnchorDocument",
            ledger_pb2.AnchorDocumentRequest(
                document_id="rpc-doc", version=2, sha256=sha("rpc2"), ingested_at=AT
            ),
        )

        async def second() -> bool:
            return len(await anchors_published(event_bus, event_names)) == 2

        await eventually(second, within=15)
        await asyncio.sleep(0.5)
    anchors = await anchors_published(event_bus, event_names)
    assert [(a.document_id, a.version) for a in anchors] == [("rpc-doc", 1), ("rpc-doc", 2)]
    assert anchors[0].anchor == first.record.anchor
    audits = await published(event_bus, event_names, AUDIT_SUBJECT, events_pb2.AuditCommitted)
    assert [a.request_id for a in audits] == ["cmpl-9"]
    engine = create_engine(sqlite_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.scalar(select(func.count()).select_from(OUTBOX))
            unpublished = await conn.scalar(
                select(func.count()).select_from(OUTBOX).where(OUTBOX.c.published_at.is_(None))
            )
            checkpoint = (await conn.execute(select(CheckpointRow.tx_id))).scalar_one()
    finally:
        await engine.dispose()
    assert (rows, unpublished) == (3, 0)
    # the follower's place is stored, so a restart resumes after it rather than replaying
    assert checkpoint == anchors[1].anchor.tx_id


async def test_recorded_completions_are_anchored(
    service: Harness, event_bus: EventBus, event_names: EventNames
) -> None:
    completion = events_pb2.CompletionRecorded(
        completion_id="cmpl-ev",
        tenant_id="acme",
        api_key_id="key-1",
        model="extractive-v1",
        prompt_sha256=sha("prompt"),
        answer_sha256=sha("answer"),
        cited_chunk_ids=["c1", "c2"],
        occurred_at=AT,
    )
    embedding = events_pb2.CompletionRecorded(completion_id="emb-1", prompt_sha256=sha("x"))
    await publish(
        event_bus, event_names, Subjects.INFERENCE_COMPLETION_RECORDED, embedding, "c:emb"
    )
    await publish(event_bus, event_names, Subjects.INFERENCE_COMPLETION_RECORDED, completion, "c:1")

    async def audited() -> bool:
        found = await published(event_bus, event_names, AUDIT_SUBJECT, events_pb2.AuditCommitted)
        return [a.request_id for a in found] == ["cmpl-ev"]

    await eventually(audited, within=15)
    record = await service.call(
        "GetAuditRecord", ledger_pb2.GetAuditRecordRequest(request_id="cmpl-ev")
    )
    assert list(record.record.cited_chunk_ids) == ["c1", "c2"]

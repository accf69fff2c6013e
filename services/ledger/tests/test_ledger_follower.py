"""The event follower on each database engine: outbox rows and checkpoint move together,
so a follower that stops anywhere and a new one that takes over write every anchored
record's event exactly once."""

from __future__ import annotations

import json

from _ledger_support import anchor_args, audit_args, sha
from sqlalchemy import select

from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.testing import eventually
from ledgerlens.services.ledger.backend import DevBackend
from ledgerlens.services.ledger.contract import AnchoringContract
from ledgerlens.services.ledger.devledger import DevLedger
from ledgerlens.services.ledger.follower import EventFollower
from ledgerlens.services.ledger.migrate import migrate
from ledgerlens.services.ledger.schema import OUTBOX


def same(subject: str) -> str:
    return subject


async def test_a_new_follower_resumes_exactly_after_the_last_event_written(
    database_url: str,
) -> None:
    await migrate(database_url)
    engine = create_engine(database_url)
    ledger = await DevLedger.open(engine, [AnchoringContract()], poll_interval=0.1)
    backend = DevBackend(ledger)
    try:
        for i in range(3):
            await backend.submit(
                "anchoring", "AnchorDocument", anchor_args(f"d{i}", 1, sha(f"{i}"))
            )
        batch = json.dumps(
            [
                {
                    "document_id": f"b{i}",
                    "version": 1,
                    "sha256": sha(f"b{i}"),
                    "source_url": "",
                    "ingested_at": "2026-11-30T00:00:00Z",
                }
                for i in range(2)
            ]
        )
        await backend.submit("anchoring", "AnchorDocuments", [batch.encode()])
        await backend.submit("anchoring", "AnchorAudit", audit_args("r1"))

        first = EventFollower(backend, engine, None, chaincode="anchoring", subject=same)
        # handle the first event only, as if the process died right after its transaction
        events = backend.events("anchoring", start_block=0)
        assert await first.handle(await anext(events)) == 1
        await events.aclose()

        second = EventFollower(backend, engine, None, chaincode="anchoring", subject=same)
        assert await second.checkpoint() == first.position
        second.start()
        try:

            async def caught_up() -> bool:
                position = second.position
                return position is not None and position.block_number == ledger.height - 1

            await eventually(caught_up, within=10)
        finally:
            await second.stop()

        async with engine.connect() as conn:
            rows = (
                await conn.execute(select(OUTBOX.c.msg_id, OUTBOX.c.payload).order_by(OUTBOX.c.id))
            ).all()
        assert [r.msg_id for r in rows] == [
            "anchor-committed:d0:1",
            "anchor-committed:d1:1",
            "anchor-committed:d2:1",
            "anchor-committed:b0:1",
            "anchor-committed:b1:1",
            "audit-committed:r1",
        ]
        batched = [events_pb2.AnchorCommitted.FromString(r.payload) for r in rows[3:5]]
        assert batched[0].anchor.tx_id == batched[1].anchor.tx_id
        assert batched[0].anchor.block_number >= 1
    finally:
        await ledger.close()
        await engine.dispose()

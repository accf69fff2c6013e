"""A process for the outbox crash tests, killed with SIGKILL at a chosen point.

    python _outbox_crash_worker.py MODE DATABASE_URL NATS_URL SUBJECT DOCUMENT_ID

It writes a ``documents`` row and its ``document ingested`` event to the outbox in
one transaction and commits. Then, by MODE:

``commit``   prints ``committed`` and blocks (killed before anything is published);
``publish``  runs the real relay, which publishes the event; right before the relay
             would mark the row published it prints ``published`` and blocks (killed
             between the publish and the mark).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from google.protobuf import struct_pb2
from sqlalchemy import Column, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ledgerlens.runtime.db import create_engine, new_metadata, session_factory
from ledgerlens.runtime.events import EventBus
from ledgerlens.runtime.outbox import OutboxRelay, add_to_outbox, outbox_table

metadata = new_metadata()
documents = Table(
    "documents",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("title", String(200), nullable=False),
)
outbox = outbox_table(metadata)


def document_event(document_id: str) -> struct_pb2.Struct:
    event = struct_pb2.Struct()
    event.update({"document_id": document_id})
    return event


class RelayKilledBeforeMarking(OutboxRelay):
    async def _mark_published(self, conn: AsyncConnection, row_ids: Sequence[int]) -> None:
        print("published", flush=True)
        await asyncio.Event().wait()  # the test kills us here


async def main(mode: str, database_url: str, nats_url: str, subject: str, doc_id: str) -> None:
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        await session.execute(insert(documents).values(id=doc_id, title="whitepaper"))
        await add_to_outbox(session, subject, document_event(doc_id), f"document-ingested:{doc_id}")
    if mode == "commit":
        print("committed", flush=True)
        await asyncio.Event().wait()
    elif mode == "publish":
        bus = await EventBus.connect(nats_url, name="crash-worker")
        await RelayKilledBeforeMarking(bus, engine).publish_pending()
    raise SystemExit(f"unknown mode {mode!r} (or the relay returned, which it must not)")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))

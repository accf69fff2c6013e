"""The event follower: chaincode events in, ``ledger.*.committed`` events out, exactly once.

Why a follower rather than publishing where a transaction is submitted: a submitter can
crash between the commit and the publish (the anchor is on the ledger, the event is
lost), and two submitters of the same record (an RPC and an event redelivery) would
publish it twice. The ledger's own event stream has neither problem — each anchored
record is emitted once, by the one valid transaction that wrote it — so this follower
reads that stream from a checkpoint kept in the service's database and, per chaincode
event, writes the outbox rows *and* the new checkpoint in one database transaction:

- a crash before that transaction commits re-reads the event from the old checkpoint
  (nothing was written, nothing is lost);
- a crash after it finds the rows in the outbox and the checkpoint past the event
  (nothing is read twice);
- the outbox relay publishes each row with ``Nats-Msg-Id`` = ``anchor-committed:<doc>:
  <version>`` / ``audit-committed:<request>``, so a crash between the publish and the
  relay marking the row is absorbed by JetStream's duplicate window, and consumers are
  idempotent on the same key beyond it.

Anchors made through the RPC and through consumed events are published the same way,
because both are just transactions on the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.common.v1 import common_pb2
from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.db import session_factory
from ledgerlens.runtime.errors import DomainError
from ledgerlens.runtime.events import Subjects
from ledgerlens.runtime.outbox import OutboxRelay, add_to_outbox
from ledgerlens.services.ledger.anchoring import parse_time
from ledgerlens.services.ledger.backend import BackendEvent, EventPosition, LedgerBackend
from ledgerlens.services.ledger.contract import (
    EVENT_AUDIT_ANCHORED,
    EVENT_DOCUMENT_ANCHORED,
    EVENT_DOCUMENTS_ANCHORED,
    AnchorRecord,
    AuditRecord,
)
from ledgerlens.services.ledger.metrics import EVENTS_FOLLOWED
from ledgerlens.services.ledger.schema import OUTBOX, CheckpointRow

__all__ = ["EventFollower", "OutboxMessage", "messages_for"]

log = logging.getLogger(__name__)

_RETRY_INITIAL: Final = 0.2
_RETRY_MAX: Final = 10.0

OutboxMessage = tuple[str, Message, str]  # subject, payload, msg id


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def messages_for(
    event: BackendEvent, channel: str, subject: Callable[[str], str]
) -> list[OutboxMessage]:
    """The platform events a chaincode event stands for (none for unknown names)."""
    if event.name == EVENT_DOCUMENT_ANCHORED:
        anchors = [AnchorRecord.from_bytes(event.payload)]
    elif event.name == EVENT_DOCUMENTS_ANCHORED:
        anchors = [AnchorRecord.from_json(r) for r in json.loads(event.payload)["records"]]
    elif event.name == EVENT_AUDIT_ANCHORED:
        audit = AuditRecord.from_bytes(event.payload)
        committed = event.committed_at or parse_time(audit.anchored_at)
        message = events_pb2.AuditCommitted(
            request_id=audit.request_id,
            prompt_sha256=audit.prompt_sha256,
            answer_sha256=audit.answer_sha256,
            anchor=_anchor(event, channel, committed),
            occurred_at=_timestamp(committed),
        )
        return [
            (
                subject(Subjects.LEDGER_AUDIT_COMMITTED),
                message,
                f"audit-committed:{audit.request_id}",
            )
        ]
    else:
        log.info("ignoring chaincode event %r of tx %s", event.name, event.tx_id)
        return []
    messages: list[OutboxMessage] = []
    for record in anchors:
        committed = event.committed_at or parse_time(record.anchored_at)
        messages.append(
            (
                subject(Subjects.LEDGER_ANCHOR_COMMITTED),
                events_pb2.AnchorCommitted(
                    document_id=record.document_id,
                    version=record.version,
                    sha256=record.sha256,
                    anchor=_anchor(event, channel, committed),
                    occurred_at=_timestamp(committed),
                ),
                # an anchor is never rewritten: (document, version) names it for good
                f"anchor-committed:{record.document_id}:{record.version}",
            )
        )
    return messages


def _anchor(event: BackendEvent, channel: str, committed: datetime) -> common_pb2.LedgerAnchor:
    return common_pb2.LedgerAnchor(
        tx_id=event.tx_id,
        block_number=event.block_number,
        committed_at=_timestamp(committed),
        channel=channel,
    )


class EventFollower:
    """Follows one chaincode's events into the outbox (see the module docstring)."""

    def __init__(
        self,
        backend: LedgerBackend,
        engine: AsyncEngine,
        relay: OutboxRelay | None,
        *,
        chaincode: str,
        subject: Callable[[str], str],
        start_block: int = 0,
    ) -> None:
        self._backend = backend
        self._sessions = session_factory(engine)
        self._relay = relay
        self._chaincode = chaincode
        self._subject = subject
        self._start_block = start_block
        self.name = f"{backend.channel}/{chaincode}"
        self._task: asyncio.Task[None] | None = None
        #: the last position written (for readiness and tests).
        self.position: EventPosition | None = None

    async def checkpoint(self) -> EventPosition | None:
        async with self._sessions() as session:
            row = await session.get(CheckpointRow, self.name)
        return EventPosition(row.block_number, row.tx_id) if row is not None else None

    async def handle(self, event: BackendEvent) -> int:
        """Writes the event's outbox rows and the checkpoint past it, atomically.
        Returns how many rows were written."""
        messages = messages_for(event, self._backend.channel, self._subject)
        async with self._sessions.begin() as session:
            ids = [msg_id for _, _, msg_id in messages]
            existing = set()
            if ids:
                # only reachable if the database was restored without its checkpoint:
                # the row is there already, so it was (or will be) published once
                found = await session.execute(
                    select(OUTBOX.c.msg_id).where(OUTBOX.c.msg_id.in_(ids))
                )
                existing = {row[0] for row in found}
            written = 0
            for subject, message, msg_id in messages:
                if msg_id in existing:
                    continue
                await add_to_outbox(
                    session, subject, message, msg_id, relay=self._relay, table=OUTBOX
                )
                written += 1
            await session.merge(
                CheckpointRow(
                    name=self.name,
                    block_number=event.block_number,
                    tx_id=event.tx_id,
                    updated_at=datetime.now(UTC),
                )
            )
        self.position = event.position
        EVENTS_FOLLOWED.labels(event.name).inc()
        return written

    async def run(self) -> None:
        """Follow forever; a failure (ledger or database away) restarts from the stored
        checkpoint after a backoff."""
        delay = _RETRY_INITIAL
        while True:
            try:
                after = await self.checkpoint()
                if after is None:
                    events = self._backend.events(self._chaincode, start_block=self._start_block)
                else:
                    events = self._backend.events(self._chaincode, after=after)
                async for event in events:
                    await self.handle(event)
                    delay = _RETRY_INITIAL
            except (DomainError, SQLAlchemyError, OSError) as exc:
                log.warning("event follower %s: %r; resuming in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"follower:{self.name}")
            self._task.add_done_callback(_log_crash)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def ready(self) -> bool:
        """A ``/readyz`` check: the follower task is alive (it retries outages itself,
        so a dead task means a bug an operator must see, not a transient failure)."""
        return self.running

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("event follower stopped: %r", task.exception())

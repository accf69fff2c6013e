"""The ledger's consumers: documents ingested and completions recorded, anchored.

A handler returns (and the bus acks) only after the anchoring transaction committed, so
a crash or a ledger outage redelivers the event; anchoring is idempotent, so the
redelivery never anchors twice (and the follower, not the handler, publishes
``ledger.*.committed``). A document that conflicts with what is anchored (another
sha256 for the same version) or an event that cannot be anchored at all raises: the bus
retries it with backoff and finally dead-letters it, where an operator sees it.

Documents are batched: each handler puts its document into an :class:`AnchorBatcher`
and waits; the batcher sends up to ``anchor_batch_size`` documents, collected for at
most ``anchor_batch_linger_seconds``, as one ``AnchorDocuments`` transaction — a block
per document would cap throughput at the block rate. The bus runs one handler at a time
per subscription, so the app binds several subscriptions to the same durable consumer
(``anchor_consumer_concurrency``) to keep the batcher fed.
"""

from __future__ import annotations

import asyncio
import logging

from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.events import EventContext
from ledgerlens.services.ledger.anchoring import Anchoring, BatchItem, DocumentAnchor, NewAudit
from ledgerlens.services.ledger.metrics import ANCHOR_BATCH_ITEMS
from ledgerlens.services.ledger.requests import anchor_from_provenance, audit_from_completion

__all__ = ["AnchorBatcher", "AnchorConflict", "AuditHandler", "DocumentHandler"]

log = logging.getLogger(__name__)


class AnchorConflict(Exception):
    """Another sha256 is already anchored for this document version."""


class AnchorBatcher:
    """Groups concurrent :meth:`anchor` calls into ``AnchorDocuments`` transactions."""

    def __init__(self, anchoring: Anchoring, *, max_batch: int, linger: float) -> None:
        self._anchoring = anchoring
        self._max_batch = max_batch
        self._linger = linger
        self._queue: asyncio.Queue[tuple[DocumentAnchor, asyncio.Future[BatchItem]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None

    async def anchor(self, item: DocumentAnchor) -> BatchItem:
        future: asyncio.Future[BatchItem] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="anchor-batcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            future.cancel()

    async def _collect(self) -> list[tuple[DocumentAnchor, asyncio.Future[BatchItem]]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        while len(batch) < self._max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            ANCHOR_BATCH_ITEMS.observe(len(batch))
            try:
                results = await self._anchoring.anchor_documents([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            # Whatever failed the transaction fails every waiting event (they are
            # redelivered); nothing is swallowed here.
            except Exception as exc:  # noqa: BLE001
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class DocumentHandler:
    """``ingestion.document.ingested`` → the document version anchored (batched)."""

    def __init__(self, batcher: AnchorBatcher) -> None:
        self._batcher = batcher

    async def __call__(self, event: events_pb2.DocumentIngested, context: EventContext) -> None:
        item = anchor_from_provenance(event.provenance)
        result = await self._batcher.anchor(item)
        if result.status == "conflict":
            raise AnchorConflict(result.error)
        log.debug("anchored %s v%s (%s)", item.document_id, item.version, result.status)


class AuditHandler:
    """``inference.completion.recorded`` → the completion's audit record anchored."""

    def __init__(self, anchoring: Anchoring) -> None:
        self._anchoring = anchoring

    async def __call__(self, event: events_pb2.CompletionRecorded, context: EventContext) -> None:
        audit: NewAudit | None = audit_from_completion(event)
        if audit is None:
            # embeddings have no answer to audit
            log.debug("completion %s has no answer: nothing to anchor", event.completion_id)
            return
        await self._anchoring.anchor_audit(audit)

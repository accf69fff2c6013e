"""The ledger's domain metrics (``ledgerlens_ledger_*``) and the backend wrapper that
records them, so both backends are measured the same way."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence

from prometheus_client import Counter, Histogram

from ledgerlens.runtime.errors import DomainError
from ledgerlens.services.ledger.backend import (
    BackendEvent,
    CommitInfo,
    EventPosition,
    LedgerBackend,
    SkipWhen,
    Submitted,
)

__all__ = [
    "ANCHOR_BATCH_ITEMS",
    "COMMIT_DURATION",
    "EVENTS_FOLLOWED",
    "TRANSACTIONS",
    "MeteredBackend",
]

COMMIT_DURATION = Histogram(
    "ledgerlens_ledger_commit_duration_seconds",
    "From endorsement to a valid commit of a submitted transaction (retries included).",
    ["backend"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
TRANSACTIONS = Counter(
    "ledgerlens_ledger_transactions_total",
    "Submitted transactions by outcome: committed, pending (async), skipped (nothing "
    "new to write), or the gRPC code name of the failure.",
    ["backend", "function", "outcome"],
)
ANCHOR_BATCH_ITEMS = Histogram(
    "ledgerlens_ledger_anchor_batch_items",
    "Documents per AnchorDocuments transaction sent for consumed events.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
EVENTS_FOLLOWED = Counter(
    "ledgerlens_ledger_events_followed_total",
    "Chaincode events the follower turned into outbox rows, by event name.",
    ["event"],
)


class MeteredBackend:
    """A :class:`LedgerBackend` that counts and times what passes through it."""

    def __init__(self, inner: LedgerBackend) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.channel = inner.channel

    def has_chaincode(self, name: str) -> bool:
        return self.inner.has_chaincode(name)

    async def submit(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
        endorsing_organizations: Sequence[str] = (),
        wait: bool = True,
        skip_when: SkipWhen | None = None,
    ) -> Submitted:
        started = time.perf_counter()
        try:
            submitted = await self.inner.submit(
                chaincode,
                function,
                args,
                transient=transient,
                endorsing_organizations=endorsing_organizations,
                wait=wait,
                skip_when=skip_when,
            )
        except DomainError as exc:
            TRANSACTIONS.labels(self.kind, function, exc.code.name).inc()
            raise
        if not submitted.submitted:
            outcome = "skipped"
        elif submitted.status.state == "pending":
            outcome = "pending"
        else:
            outcome = "committed"
            COMMIT_DURATION.labels(self.kind).observe(time.perf_counter() - started)
        TRANSACTIONS.labels(self.kind, function, outcome).inc()
        return submitted

    async def evaluate(
        self,
        chaincode: str,
        function: str,
        args: Sequence[bytes],
        *,
        transient: Mapping[str, bytes] | None = None,
    ) -> bytes:
        return await self.inner.evaluate(chaincode, function, args, transient=transient)

    async def commit_status(
        self, tx_id: str, *, wait: bool = False, wait_seconds: float | None = None
    ) -> CommitInfo:
        return await self.inner.commit_status(tx_id, wait=wait, wait_seconds=wait_seconds)

    def events(
        self,
        chaincode: str,
        *,
        start_block: int | None = None,
        after: EventPosition | None = None,
        event_names: Collection[str] = (),
    ) -> AsyncIterator[BackendEvent]:
        return self.inner.events(
            chaincode, start_block=start_block, after=after, event_names=event_names
        )

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def close(self) -> None:
        await self.inner.close()

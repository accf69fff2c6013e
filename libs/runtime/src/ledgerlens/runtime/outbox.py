"""Transactional outbox: an event is written in the same transaction as the data.

    async with sessions.begin() as session:
        session.add(document)
        await add_to_outbox(session, Subjects.INGESTION_DOCUMENT_INGESTED, event,
                            msg_id=f"document-ingested:{document.id}", relay=relay)

    relay = OutboxRelay(bus, engine)      # at service start
    relay.start()                         # polls, and wakes up when nudged after a commit
    ...
    await relay.stop()

The relay publishes unpublished rows in id order, each with its ``msg_id`` as
``Nats-Msg-Id``, then marks the batch published in one statement. A crash after a
publish but before the mark re-publishes the row on restart, and JetStream's duplicate
window stores it once (consumers are idempotent as well, for restarts later than the
window). On PostgreSQL several relays may run: each claims its batch with ``SELECT ...
FOR UPDATE SKIP LOCKED`` (so order holds within a batch, not across concurrent relays).
On SQLite run one relay per database file. While running, the relay deletes rows it
published longer ago than ``keep_published`` (7 days by default; services pass
``LEDGERLENS_<SVC>_OUTBOX_KEEP_PUBLISHED_SECONDS``), hourly, so the table stays small.

The table lives in the service's own MetaData, so its alembic migrations create it::

    class Base(DeclarativeBase):
        metadata = new_metadata()
    outbox_table(Base.metadata)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
from google.protobuf.message import Message
from opentelemetry import propagate
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    Text,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from ledgerlens.runtime.db import new_metadata
from ledgerlens.runtime.events.bus import EventBus, message_headers

__all__ = [
    "OUTBOX_METADATA",
    "OutboxPublishError",
    "OutboxRelay",
    "add_to_outbox",
    "delete_published",
    "outbox",
    "outbox_table",
]

log = logging.getLogger(__name__)

_MAX_ERROR_TEXT = 2000


def _now() -> datetime:
    return datetime.now(UTC)


def outbox_table(metadata: MetaData, name: str = "outbox") -> Table:
    """Add the outbox table to ``metadata`` (or return it if it is already there)."""
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        # SQLite only auto-increments an INTEGER PRIMARY KEY, PostgreSQL gets a bigint.
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("subject", String(255), nullable=False),
        Column("msg_id", String(255), nullable=False, unique=True),
        Column("payload", LargeBinary, nullable=False),
        #: NATS headers to send, including the traceparent of the writing request.
        Column("headers", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, default=_now),
        Column("published_at", DateTime(timezone=True), nullable=True),
        #: publish attempts so far (failed ones and the successful one).
        Column("attempts", Integer, nullable=False, default=0, server_default="0"),
        Column("last_error", Text, nullable=True),
        Index(f"ix_{name}_unpublished", "published_at", "id"),
    )


#: a MetaData holding only the outbox table (tests, tools, single-table services).
OUTBOX_METADATA = new_metadata()
#: the outbox table; statements only use its name, so it works for any service's table.
outbox = outbox_table(OUTBOX_METADATA)


async def add_to_outbox(
    session: AsyncSession,
    subject: str,
    message: Message,
    msg_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    relay: OutboxRelay | None = None,
    table: Table = outbox,
) -> None:
    """Write ``message`` to the outbox inside the session's current transaction.

    The trace context of the caller is stored with it, so the event continues the
    writer's trace even though the relay publishes it later. With ``relay``, the relay
    is nudged when the session commits instead of waiting for its next poll.
    """
    if not msg_id:
        raise ValueError("msg_id is required: it is what makes the relay idempotent")
    carrier: dict[str, str] = {**(headers or {}), **message_headers(message)}
    propagate.inject(carrier)
    await session.execute(
        insert(table).values(
            subject=subject,
            msg_id=msg_id,
            payload=message.SerializeToString(),
            headers=carrier,
            created_at=_now(),
            attempts=0,
        )
    )
    if relay is not None:
        relay.nudge_after_commit(session)


async def delete_published(engine: AsyncEngine, before: datetime, table: Table = outbox) -> int:
    """Housekeeping: delete rows published before ``before``. Returns how many."""
    async with engine.begin() as conn:
        result = await conn.execute(
            delete(table).where(table.c.published_at.is_not(None), table.c.published_at < before)
        )
    return int(result.rowcount)


#: how long a published outbox row is kept by default (7 days)
DEFAULT_KEEP_PUBLISHED_SECONDS = 7 * 24 * 3600.0


class OutboxPublishError(Exception):
    """Publishing an outbox row failed (NATS unreachable or no stream for the subject)."""


_RETRYABLE = (OutboxPublishError, SQLAlchemyError, OSError)
_PUBLISH_ERRORS = (nats.errors.Error, asyncio.TimeoutError)


class OutboxRelay:
    """Publishes outbox rows to JetStream, in order, retrying with backoff."""

    def __init__(
        self,
        bus: EventBus,
        engine: AsyncEngine,
        *,
        table: Table = outbox,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
        publish_timeout: float = 5.0,
        keep_published: float | None = DEFAULT_KEEP_PUBLISHED_SECONDS,
        prune_interval: float = 3600.0,
    ) -> None:
        """``keep_published``: seconds a published row stays (for looking into what was
        sent; JetStream holds the events themselves), deleted every ``prune_interval``
        while running; None keeps every row."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if keep_published is not None and keep_published < 0:
            raise ValueError("keep_published must not be negative")
        self.keep_published = keep_published
        self.prune_interval = prune_interval
        self._bus = bus
        self._engine = engine
        self._table = table
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._publish_timeout = publish_timeout
        # Only PostgreSQL can skip rows another relay holds; SQLite has one writer.
        self._skip_locked = engine.dialect.name == "postgresql"
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # -- one batch ---------------------------------------------------------------------

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished rows; returns how many were published.

        Raises :class:`OutboxPublishError` (after recording the attempt) when a publish
        fails; rows before it stay marked, the failed row and later ones are retried.
        """
        t = self._table
        query = (
            select(t.c.id, t.c.subject, t.c.msg_id, t.c.payload, t.c.headers)
            .where(t.c.published_at.is_(None))
            .order_by(t.c.id)
            .limit(self.batch_size)
        )
        if self._skip_locked:
            query = query.with_for_update(skip_locked=True)
        async with self._engine.begin() as conn:
            rows = (await conn.execute(query)).all()
            published, failure = await self._publish_rows(conn, rows)
        if failure is not None:
            raise OutboxPublishError(f"publishing outbox rows failed: {failure!r}") from failure
        return published

    async def publish_all(self) -> int:
        """Publish until nothing is pending (tests, tools, shutdown). Returns the count."""
        total = 0
        while True:
            published = await self.publish_pending()
            total += published
            if published < self.batch_size:
                return total

    async def _publish_rows(
        self, conn: AsyncConnection, rows: Sequence[Row[Any, Any, Any, Any, Any]]
    ) -> tuple[int, BaseException | None]:
        t = self._table
        done: list[int] = []
        failure: BaseException | None = None
        for row in rows:
            headers = dict(row.headers or {})
            try:
                await self._bus.publish_bytes(
                    row.subject,
                    row.payload,
                    row.msg_id,
                    headers,
                    parent=propagate.extract(headers),
                    timeout_seconds=self._publish_timeout,
                )
            except _PUBLISH_ERRORS as exc:
                # Stop at the first failure so later rows never overtake this one.
                await conn.execute(
                    update(t)
                    .where(t.c.id == row.id)
                    .values(attempts=t.c.attempts + 1, last_error=repr(exc)[:_MAX_ERROR_TEXT])
                )
                failure = exc
                break
            done.append(row.id)
        if done:
            await self._mark_published(conn, done)
        return len(done), failure

    async def _mark_published(self, conn: AsyncConnection, row_ids: Sequence[int]) -> None:
        # One UPDATE for the batch, after its publishes: on SQLite the first write of a
        # transaction takes the database's write lock, and marking each row as it went
        # held that lock across every later publish, stalling the writers whose commits
        # fill the outbox. A crash before this UPDATE republishes the batch under the
        # same Nats-Msg-Id, which JetStream drops as duplicates.
        t = self._table
        await conn.execute(
            update(t)
            .where(t.c.id.in_(list(row_ids)))
            .values(published_at=_now(), attempts=t.c.attempts + 1, last_error=None)
        )

    async def prune(self) -> int:
        """Delete the rows published over ``keep_published`` seconds ago; how many. A
        failure is logged and left for the next round: publishing matters more."""
        if self.keep_published is None:
            return 0
        before = _now() - timedelta(seconds=self.keep_published)
        try:
            deleted = await delete_published(self._engine, before, self._table)
        except SQLAlchemyError as exc:
            log.warning("outbox relay: pruning published rows failed: %r", exc)
            return 0
        if deleted:
            log.info("outbox relay: pruned %d rows published before %s", deleted, before)
        return deleted

    # -- running in the background -----------------------------------------------------

    def nudge(self) -> None:
        """Publish now instead of at the next poll (call after committing outbox rows)."""
        self._wakeup.set()

    def nudge_after_commit(self, session: AsyncSession) -> None:
        def after_commit(_session: Session) -> None:
            self.nudge()

        event.listen(session.sync_session, "after_commit", after_commit, once=True)

    def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self._task = asyncio.create_task(self.run(), name="outbox-relay")
        self._task.add_done_callback(_log_crash)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Finish the batch in flight (up to ``grace_seconds``), then stop."""
        self._stopping = True
        self._wakeup.set()
        task = self._task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=grace_seconds)
        if not done:
            task.cancel()
            await asyncio.wait({task})

    async def run(self) -> None:
        """Publish forever: poll every ``poll_interval`` or when nudged; prune published
        rows every ``prune_interval``."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while not self._stopping:
            self._wakeup.clear()
            try:
                published = await self._publish_with_retries()
            except _RETRYABLE:
                if self._stopping:
                    return
                raise
            if self.keep_published is not None and loop.time() >= next_prune:
                next_prune = loop.time() + self.prune_interval
                await self.prune()
            if published >= self.batch_size:
                continue  # more are waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.poll_interval)

    async def _publish_with_retries(self) -> int:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_RETRYABLE),
            wait=wait_exponential_jitter(
                multiplier=self._retry_initial, max=self._retry_max, jitter=self._retry_initial
            ),
            stop=self._stop_requested,
            sleep=self._sleep_unless_stopped,
            before_sleep=_log_retry,
            reraise=True,
        ):
            with attempt:
                return await self.publish_pending()
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _stop_requested(self, _state: RetryCallState) -> bool:
        return self._stopping

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return
            if not self._stopping:
                # A nudge is no reason to retry early against a server that is down.
                self._wakeup.clear()


def _log_retry(state: RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("outbox relay: %r; retrying in %.1fs", error, delay)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("outbox relay stopped: %r", task.exception())

"""Persistence of usage rows and revoked API keys (SQLite or PostgreSQL, SQLAlchemy async).

A usage row and its ``CompletionRecorded`` outbox event are written in one
transaction. Rows hold ids, counts and money only: never prompt or answer text.
``usage`` aggregates in SQL per period (UTC hour, day or month), API key and model.
``inference_revoked_keys`` keeps the key ids of ``identity.key.revoked`` so a restarted
replica still refuses their tokens (``revocations.py``).
"""

from __future__ import annotations

import asyncio
import calendar
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

from google.protobuf.message import Message
from opentelemetry import propagate
from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Index,
    Integer,
    String,
    Table,
    event,
    func,
    insert,
    select,
)
from sqlalchemy import Engine as SyncEngine
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapped, mapped_column

from ledgerlens.runtime.db import session_factory
from ledgerlens.runtime.events.bus import message_headers
from ledgerlens.runtime.outbox import OutboxRelay
from ledgerlens.services.inference.schema import OUTBOX, Base, UtcDateTime

__all__ = [
    "Granularity",
    "OutboxEvent",
    "RevokedKeyRow",
    "UsageBucket",
    "UsageRecord",
    "UsageRow",
    "UsageStore",
    "period_end",
]

Granularity = Literal["hour", "day", "month"]
CompletionKindName = Literal["chat", "answer", "embed"]


class UsageRow(Base):
    __tablename__ = "inference_usage"

    completion_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    api_key_id: Mapped[str] = mapped_column(String(64), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    provider: Mapped[str] = mapped_column(String(100), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    cost_micro_usd: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cached: Mapped[bool] = mapped_column(Boolean, nullable=False)
    estimated: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)

    __table_args__ = (
        Index("ix_inference_usage_tenant_created", "tenant_id", "created_at"),
        Index("ix_inference_usage_key_created", "api_key_id", "created_at"),
    )


class RevokedKeyRow(Base):
    """An API key identity revoked: its tokens are refused until they expire."""

    __tablename__ = "inference_revoked_keys"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    revoked_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One accounted completion (a row of ``inference_usage``)."""

    completion_id: str
    kind: CompletionKindName
    tenant_id: str
    api_key_id: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    cached: bool
    estimated: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """Aggregated usage of one period, API key and model (``UsageRow`` of GetUsage);
    for totals the period, key and model are empty."""

    period_start: datetime | None
    period_end: datetime | None
    tenant_id: str
    api_key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    subject: str
    message: Message
    msg_id: str


def period_end(start: datetime, granularity: Granularity) -> datetime:
    if granularity == "hour":
        return start + timedelta(hours=1)
    if granularity == "day":
        return start + timedelta(days=1)
    days = calendar.monthrange(start.year, start.month)[1]
    return start + timedelta(days=days)


_SQLITE_FORMATS: dict[str, str] = {
    "hour": "%Y-%m-%d %H:00:00",
    "day": "%Y-%m-%d 00:00:00",
    "month": "%Y-%m-01 00:00:00",
}


#: most records one group-commit transaction writes
_MAX_BATCH = 256
_USAGE = cast(Table, UsageRow.__table__)
#: how long after a commit the outbox relay is woken (the events' extra delay)
_NUDGE_DELAY = 0.05
#: how long the SQLite writer waits for another writer (the relay) to release the lock
_SQLITE_BUSY_TIMEOUT_MS = 30_000


@dataclass(slots=True)
class _Pending:
    """A record waiting for the group-commit writer."""

    values: dict[str, Any]
    outbox: dict[str, Any] | None
    relay: OutboxRelay | None
    done: asyncio.Future[bool]


def _usage_values(record: UsageRecord) -> dict[str, Any]:
    return {
        "completion_id": record.completion_id,
        "tenant_id": record.tenant_id,
        "api_key_id": record.api_key_id,
        "model": record.model,
        "provider": record.provider,
        "kind": record.kind,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_micro_usd": record.cost_micro_usd,
        "cached": record.cached,
        "estimated": record.estimated,
        "created_at": record.created_at,
    }


def _outbox_values(event: OutboxEvent) -> dict[str, Any]:
    """The outbox row ``add_to_outbox`` writes, built in the caller's context (so the
    stored trace context is the calling request's, not the writer task's)."""
    if not event.msg_id:
        raise ValueError("msg_id is required: it is what makes the relay idempotent")
    carrier = message_headers(event.message)
    propagate.inject(carrier)
    return {
        "subject": event.subject,
        "msg_id": event.msg_id,
        "payload": event.message.SerializeToString(),
        "headers": carrier,
        "created_at": datetime.now(UTC),
        "attempts": 0,
    }


class _SqliteFileWriter:
    """Group-commit transactions on a SQLite file, each written in one hop to a thread.

    Through aiosqlite every statement, the BEGIN and the COMMIT is a round trip to its
    thread and back to the event loop (about ten a transaction, each a wake-up of both):
    that was most of the accounting write's CPU and latency. Here the whole transaction
    (two multi-row inserts and the commit, the fsync included) runs in one call on a
    thread of its own, with the standard library's driver, which releases the GIL while
    SQLite works. The commit is the same ``synchronous=FULL`` WAL commit as before.
    """

    def __init__(self, engine: SyncEngine) -> None:
        self._engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-writer")

    @classmethod
    def of(cls, engine: AsyncEngine) -> _SqliteFileWriter | None:
        """A writer for ``engine``'s database file; None unless it is a SQLite file."""
        url = engine.url
        if engine.dialect.name != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        if url.query.get("mode") == "memory" or str(url.database).startswith("file::memory"):
            return None
        sync = create_sync_engine(url.set(drivername="sqlite"))
        event.listen(sync, "connect", _writer_pragmas)
        return cls(sync)

    async def write(self, batch: list[_Pending]) -> list[bool]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._write, batch)

    def _write(self, batch: list[_Pending]) -> list[bool]:
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(_USAGE), [p.values for p in batch])
                events = [p.outbox for p in batch if p.outbox is not None]
                if events:
                    conn.execute(insert(OUTBOX), events)
        except IntegrityError:
            if len(batch) == 1:
                return [False]
            return [self._write([p])[0] for p in batch]
        return [True] * len(batch)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._engine.dispose()


def _writer_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged completion is on disk
    finally:
        cursor.close()


class UsageStore:
    """The ``inference_usage`` table and the outbox, over one AsyncEngine (tables are
    created by migrations: ``ledgerlens.services.inference.migrate``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = session_factory(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        self._nudging: set[int] = set()
        self._file_writer = _SqliteFileWriter.of(engine)

    async def aclose(self) -> None:
        """Stop the SQLite writer thread (the engine is the caller's to dispose)."""
        if self._writer is not None and not self._writer.done():
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._file_writer is not None:
            self._file_writer.close()

    async def insert(
        self,
        record: UsageRecord,
        event: OutboxEvent | None = None,
        *,
        relay: OutboxRelay | None = None,
    ) -> bool:
        """Write the row and ``event`` (to the outbox) in one transaction, committed
        before this returns. Returns ``False`` (and writes nothing) when
        ``completion_id`` was recorded before.

        Concurrent calls share a transaction (group commit): rows queued while a
        transaction is being written go into the next one, as one multi-row insert per
        table, so under load a commit (and its fsync) serves many calls. A batch that
        hits a duplicate is rolled back and written one record a transaction, so a
        duplicate never costs another call its row."""
        pending = _Pending(
            _usage_values(record),
            _outbox_values(event) if event is not None else None,
            relay,
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(pending)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name="usage-writer")
        return await pending.done

    async def _write_queued(self) -> None:
        while self._queue:
            batch = self._queue[:_MAX_BATCH]
            del self._queue[:_MAX_BATCH]
            try:
                inserted = await self._write_batch(batch)
            except asyncio.CancelledError:
                for p in (*batch, *self._queue):
                    p.done.cancel()
                self._queue.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
                continue
            for p, ok in zip(batch, inserted, strict=True):
                if not p.done.done():
                    p.done.set_result(ok)
            for relay in {id(p.relay): p.relay for p in batch if p.relay is not None}.values():
                self._nudge_soon(relay)

    def _nudge_soon(self, relay: OutboxRelay) -> None:
        """Wake the relay ``_NUDGE_DELAY`` after a commit, once for all the commits in
        that time: a relay pass (a select, a publish and an update per row, a commit)
        per call cost more CPU than the call's own write."""
        if id(relay) in self._nudging:
            return
        self._nudging.add(id(relay))

        def nudge() -> None:
            self._nudging.discard(id(relay))
            relay.nudge()

        asyncio.get_running_loop().call_later(_NUDGE_DELAY, nudge)

    async def _write_batch(self, batch: list[_Pending]) -> list[bool]:
        if self._file_writer is not None:
            return await self._file_writer.write(batch)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(_USAGE), [p.values for p in batch])
                events = [p.outbox for p in batch if p.outbox is not None]
                if events:
                    await conn.execute(insert(OUTBOX), events)
        except IntegrityError:
            if len(batch) == 1:
                return [False]
            return [(await self._write_batch([p]))[0] for p in batch]
        return [True] * len(batch)

    async def get(self, completion_id: str) -> UsageRecord | None:
        async with self._sessions() as session:
            row = await session.get(UsageRow, completion_id)
        if row is None:
            return None
        return UsageRecord(
            completion_id=row.completion_id,
            kind=row.kind,  # type: ignore[arg-type]
            tenant_id=row.tenant_id,
            api_key_id=row.api_key_id,
            model=row.model,
            provider=row.provider,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost_micro_usd=row.cost_micro_usd,
            cached=row.cached,
            estimated=row.estimated,
            created_at=row.created_at,
        )

    async def add_revoked_key(self, key_id: str, tenant_id: str, revoked_at: datetime) -> bool:
        """Remember a revoked key; ``False`` when it was known (redeliveries are no-ops)."""
        try:
            async with self._sessions.begin() as session:
                session.add(
                    RevokedKeyRow(key_id=key_id, tenant_id=tenant_id, revoked_at=revoked_at)
                )
        except IntegrityError:
            return False
        return True

    async def revoked_key_ids(self) -> set[str]:
        async with self._sessions() as session:
            return set((await session.execute(select(RevokedKeyRow.key_id))).scalars())

    def _period(self, granularity: Granularity) -> ColumnElement[Any]:
        column = UsageRow.__table__.c.created_at
        if self._sqlite:
            return func.strftime(_SQLITE_FORMATS[granularity], column)
        return func.date_trunc(granularity, func.timezone("UTC", column))

    def _filters(
        self,
        tenant_id: str,
        api_key_id: str | None,
        model: str | None,
        since: datetime,
        until: datetime,
    ) -> list[ColumnElement[bool]]:
        t = UsageRow
        where = [t.tenant_id == tenant_id, t.created_at >= since, t.created_at < until]
        if api_key_id:
            where.append(t.api_key_id == api_key_id)
        if model:
            where.append(t.model == model)
        return where

    async def usage(
        self,
        tenant_id: str,
        api_key_id: str | None,
        model: str | None,
        since: datetime,
        until: datetime,
        granularity: Granularity = "day",
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[UsageBucket]:
        """Rows per (period, api key, model), ordered by period, key, model; periods
        are UTC. ``since`` inclusive, ``until`` exclusive. ``limit``/``offset`` page."""
        t = UsageRow
        period = self._period(granularity).label("period")
        query = (
            select(
                period,
                t.api_key_id,
                t.model,
                func.count().label("requests"),
                func.coalesce(func.sum(t.prompt_tokens), 0),
                func.coalesce(func.sum(t.completion_tokens), 0),
                func.coalesce(func.sum(t.cost_micro_usd), 0),
            )
            .where(*self._filters(tenant_id, api_key_id, model, since, until))
            .group_by(period, t.api_key_id, t.model)
            .order_by(period, t.api_key_id, t.model)
            .offset(offset)
        )
        if limit is not None:
            query = query.limit(limit)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        buckets = []
        for start_raw, key, mdl, requests, prompt, completion, cost in rows:
            start = _as_utc(start_raw)
            buckets.append(
                UsageBucket(
                    period_start=start,
                    period_end=period_end(start, granularity),
                    tenant_id=tenant_id,
                    api_key_id=key,
                    model=mdl,
                    requests=int(requests),
                    prompt_tokens=int(prompt),
                    completion_tokens=int(completion),
                    cost_micro_usd=int(cost),
                )
            )
        return buckets

    async def usage_total(
        self,
        tenant_id: str,
        api_key_id: str | None,
        model: str | None,
        since: datetime,
        until: datetime,
    ) -> UsageBucket:
        """Sums over the whole selection (GetUsageResponse.total)."""
        t = UsageRow
        query = select(
            func.count(),
            func.coalesce(func.sum(t.prompt_tokens), 0),
            func.coalesce(func.sum(t.completion_tokens), 0),
            func.coalesce(func.sum(t.cost_micro_usd), 0),
        ).where(*self._filters(tenant_id, api_key_id, model, since, until))
        async with self._sessions() as session:
            requests, prompt, completion, cost = (await session.execute(query)).one()
        return UsageBucket(
            period_start=None,
            period_end=None,
            tenant_id=tenant_id,
            api_key_id="",
            model="",
            requests=int(requests),
            prompt_tokens=int(prompt),
            completion_tokens=int(completion),
            cost_micro_usd=int(cost),
        )


def _as_utc(value: Any) -> datetime:
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(parsed, datetime):
        raise TypeError(f"unexpected period value {value!r}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)

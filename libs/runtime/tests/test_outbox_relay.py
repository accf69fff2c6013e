"""The transactional outbox and its relay, on SQLite and PostgreSQL, against real NATS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.db import create_engine, new_metadata, session_factory
from ledgerlens.runtime.events import (
    HEADER_MSG_ID,
    STREAMS,
    EventBus,
    StreamSpec,
    Subjects,
)
from ledgerlens.runtime.outbox import (
    OUTBOX_METADATA,
    OutboxPublishError,
    OutboxRelay,
    add_to_outbox,
    delete_published,
    outbox,
    outbox_table,
)
from ledgerlens.runtime.testing import EventNames, PrivateNatsServer, eventually

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgres"])
def relay_database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_schema_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def engine(relay_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(relay_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(OUTBOX_METADATA.create_all)
    yield engine
    await engine.dispose()


def _event(n: int) -> struct_pb2.Struct:
    event = struct_pb2.Struct()
    event.update({"n": n})
    return event


async def _stream(bus: EventBus, names: EventNames) -> tuple[StreamSpec, str]:
    stream = names.stream(STREAMS["INGESTION"])
    await bus.ensure_stream(stream)
    return stream, names.subject(Subjects.INGESTION_DOCUMENT_INGESTED)


async def _stored(bus: EventBus, stream: StreamSpec) -> list[tuple[str, int]]:
    """(msg id, n) of every message in the stream, in stream order."""
    info = await bus.manager.stream_info(stream.name)
    found = []
    for seq in range(1, info.state.last_seq + 1):
        msg = await bus.manager.get_msg(stream.name, seq)
        found.append(
            (
                (msg.headers or {})[HEADER_MSG_ID],
                int(struct_pb2.Struct.FromString(msg.data or b"").fields["n"].number_value),
            )
        )
    return found


async def _unpublished(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        return int((await conn.execute(query)).scalar_one())


async def test_committed_rows_are_published_in_order_rolled_back_never(
    engine: AsyncEngine, event_bus: EventBus, event_names: EventNames
) -> None:
    stream, subject = await _stream(event_bus, event_names)
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        for n in range(3):
            await add_to_outbox(session, subject, _event(n), f"evt-{n}")

    async def write_then_fail() -> None:
        async with sessions.begin() as session:
            await add_to_outbox(session, subject, _event(99), "evt-rolled-back")
            raise RuntimeError("the data write failed")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    async with sessions.begin() as session:
        await add_to_outbox(session, subject, _event(3), "evt-3")

    relay = OutboxRelay(event_bus, engine, batch_size=2)
    assert await relay.publish_all() == 4
    assert await relay.publish_all() == 0

    assert await _stored(event_bus, stream) == [(f"evt-{n}", n) for n in range(4)]
    assert await _unpublished(engine) == 0


async def test_msg_id_is_unique_in_the_outbox(engine: AsyncEngine, event_names: EventNames) -> None:
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        await add_to_outbox(session, "t.x.v1", _event(1), "same")

    async def write_again() -> None:
        async with sessions.begin() as session:
            await add_to_outbox(session, "t.x.v1", _event(2), "same")

    with pytest.raises(IntegrityError):
        await write_again()


async def test_nudge_after_commit_publishes_without_waiting_for_the_poll(
    engine: AsyncEngine, event_bus: EventBus, event_names: EventNames
) -> None:
    stream, subject = await _stream(event_bus, event_names)
    relay = OutboxRelay(event_bus, engine, poll_interval=60.0)
    relay.start()
    try:
        await asyncio.sleep(0.2)  # the relay's first poll found nothing; next one in 60 s
        started = time.monotonic()
        async with session_factory(engine).begin() as session:
            await add_to_outbox(session, subject, _event(7), "evt-7", relay=relay)

        async def published() -> bool:
            return await _unpublished(engine) == 0

        await eventually(published, within=5, message="nudged publish")
        assert time.monotonic() - started < 5
        assert await _stored(event_bus, stream) == [("evt-7", 7)]
    finally:
        await relay.stop()
    assert not relay.running


async def test_relay_retries_while_nats_is_down(
    engine: AsyncEngine, nats_server: PrivateNatsServer, event_names: EventNames
) -> None:
    bus = await EventBus.connect(nats_server.url, name="test-relay-down")
    try:
        stream, subject = await _stream(bus, event_names)
        nats_server.stop()
        async with session_factory(engine).begin() as session:
            await add_to_outbox(session, subject, _event(1), "evt-1")

        relay = OutboxRelay(
            bus, engine, poll_interval=0.1, retry_initial=0.05, retry_max=0.3, publish_timeout=0.3
        )
        with pytest.raises(OutboxPublishError):
            await relay.publish_pending()
        relay.start()

        async def attempted_twice() -> bool:
            async with engine.connect() as conn:
                attempts = (await conn.execute(select(outbox.c.attempts))).scalar_one()
                return int(attempts) >= 2

        await eventually(attempted_twice, message="retries while NATS is down")
        assert await _unpublished(engine) == 1

        nats_server.start()

        async def published() -> bool:
            return await _unpublished(engine) == 0

        await eventually(published, within=15, message="published after NATS came back")
        await relay.stop()
        # Publishes that timed out may have reached the server; dedupe keeps one.
        assert await _stored(bus, stream) == [("evt-1", 1)]
    finally:
        await bus.close(grace_seconds=1)


async def test_two_relays_on_postgres_publish_each_row_once(
    pg_schema_url: str, event_bus: EventBus, event_names: EventNames
) -> None:
    stream, subject = await _stream(event_bus, event_names)
    engines = [create_engine(pg_schema_url), create_engine(pg_schema_url)]
    try:
        async with engines[0].begin() as conn:
            await conn.run_sync(OUTBOX_METADATA.create_all)
        async with session_factory(engines[0]).begin() as session:
            for n in range(40):
                await add_to_outbox(session, subject, _event(n), f"evt-{n}")

        relays = [OutboxRelay(event_bus, e, batch_size=5) for e in engines]
        counts = await asyncio.gather(*(r.publish_all() for r in relays))
    finally:
        for e in engines:
            await e.dispose()

    # Without SKIP LOCKED both relays would publish the same rows: the sum would exceed 40.
    assert sum(counts) == 40
    stored = await _stored(event_bus, stream)
    assert sorted(n for _, n in stored) == list(range(40))


async def test_outbox_carries_the_writers_trace(
    engine: AsyncEngine,
    event_bus: EventBus,
    event_names: EventNames,
    span_exporter: InMemorySpanExporter,
) -> None:
    stream, subject = await _stream(event_bus, event_names)
    with trace.get_tracer("test").start_as_current_span("ingest request") as request:
        async with session_factory(engine).begin() as session:
            await add_to_outbox(session, subject, _event(1), "evt-1")
    # Published later, outside the request's span.
    assert await OutboxRelay(event_bus, engine).publish_all() == 1

    msg = await event_bus.manager.get_msg(stream.name, 1)
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert (msg.headers or {})["traceparent"].split("-")[1] == trace_id
    publish = [s for s in span_exporter.get_finished_spans() if s.name == f"{subject} publish"]
    assert [s.context.trace_id for s in publish] == [request.get_span_context().trace_id]


async def test_delete_published_removes_only_published_rows(
    engine: AsyncEngine, event_bus: EventBus, event_names: EventNames
) -> None:
    _, subject = await _stream(event_bus, event_names)
    async with session_factory(engine).begin() as session:
        await add_to_outbox(session, subject, _event(1), "evt-1")
    await OutboxRelay(event_bus, engine).publish_all()
    async with session_factory(engine).begin() as session:
        await add_to_outbox(session, subject, _event(2), "evt-2")

    assert await delete_published(engine, datetime.now(UTC) + timedelta(minutes=1)) == 1
    async with engine.connect() as conn:
        left = (await conn.execute(select(outbox.c.msg_id))).scalars().all()
    assert left == ["evt-2"]


def test_outbox_table_joins_a_service_metadata_once() -> None:
    metadata = new_metadata()
    table = outbox_table(metadata)
    assert outbox_table(metadata) is table
    assert table.metadata is metadata
    assert {c.name for c in table.columns} == {
        "id",
        "subject",
        "msg_id",
        "payload",
        "headers",
        "created_at",
        "published_at",
        "attempts",
        "last_error",
    }
    assert table.c.msg_id.unique
    assert table.c.published_at.nullable


async def test_running_relay_prunes_published_rows_past_their_keep(
    engine: AsyncEngine, event_bus: EventBus, event_names: EventNames
) -> None:
    """The outbox does not grow forever: the running relay deletes what it published
    longer ago than ``keep_published``, and keeps what it published since (a row not
    published yet is never deleted: see the test above)."""
    _, subject = await _stream(event_bus, event_names)
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        await add_to_outbox(session, subject, _event(1), "evt-old")
    await OutboxRelay(event_bus, engine).publish_all()
    async with engine.begin() as conn:  # published two hours ago
        await conn.execute(
            outbox.update().values(published_at=datetime.now(UTC) - timedelta(hours=2))
        )

    relay = OutboxRelay(
        event_bus, engine, keep_published=3600.0, prune_interval=0.05, poll_interval=0.05
    )
    relay.start()
    try:
        async with sessions.begin() as session:
            await add_to_outbox(session, subject, _event(2), "evt-new", relay=relay)

        async def left() -> list[str]:
            async with engine.connect() as conn:
                return list((await conn.execute(select(outbox.c.msg_id))).scalars().all())

        async def pruned() -> bool:
            return await left() == ["evt-new"] and await _unpublished(engine) == 0

        await eventually(pruned, within=10, message="the old published row pruned")
    finally:
        await relay.stop(grace_seconds=1)
    assert await OutboxRelay(event_bus, engine, keep_published=3600.0).prune() == 0
    assert await OutboxRelay(event_bus, engine, keep_published=None).prune() == 0
    assert await left() == ["evt-new"]

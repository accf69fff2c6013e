"""A process killed between the outbox commit and the publish loses nothing, duplicates nothing."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest
from google.protobuf import struct_pb2
from sqlalchemy import select, text

from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.events import STREAMS, EventBus, StreamSpec, Subjects
from ledgerlens.runtime.outbox import OutboxRelay, outbox
from ledgerlens.runtime.testing import EventNames

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER = Path(__file__).with_name("_outbox_crash_worker.py")


async def _run_until(
    mode: str, expected: str, database_url: str, nats_url: str, subject: str, doc_id: str
) -> None:
    """Start the worker, wait for it to report ``expected``, then SIGKILL it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        mode,
        database_url,
        nats_url,
        subject,
        doc_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    except TimeoutError:
        line = b""
    if line.decode().strip() != expected:
        process.kill()
        _, err = await process.communicate()
        pytest.fail(f"worker said {line!r}, not {expected!r}:\n{err.decode()}")
    process.send_signal(signal.SIGKILL)
    assert await process.wait() == -signal.SIGKILL


async def _messages(bus: EventBus, stream: StreamSpec, subject: str) -> list[struct_pb2.Struct]:
    info = await bus.manager.stream_info(stream.name)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await bus.manager.get_msg(stream.name, seq)
        if msg.subject == subject:
            found.append(struct_pb2.Struct.FromString(msg.data or b""))
    return found


async def _prepare(bus: EventBus, names: EventNames) -> tuple[StreamSpec, str]:
    stream = names.stream(STREAMS["INGESTION"])
    await bus.ensure_stream(stream)
    return stream, names.subject(Subjects.INGESTION_DOCUMENT_INGESTED)


async def test_killed_after_commit_before_publish(
    database_url: str, nats_url: str, event_bus: EventBus, event_names: EventNames
) -> None:
    stream, subject = await _prepare(event_bus, event_names)

    await _run_until("commit", "committed", database_url, nats_url, subject, "doc-1")
    assert await _messages(event_bus, stream, subject) == []  # died before publishing

    engine = create_engine(database_url)
    try:
        relay = OutboxRelay(event_bus, engine)
        assert await relay.publish_all() == 1  # the restarted relay finds the row
        assert await relay.publish_all() == 0
        async with engine.connect() as conn:
            titles = (await conn.execute(text("SELECT title FROM documents"))).scalars().all()
            published = (await conn.execute(select(outbox.c.published_at))).scalars().all()
    finally:
        await engine.dispose()

    events = await _messages(event_bus, stream, subject)
    assert [e["document_id"] for e in events] == ["doc-1"]
    assert titles == ["whitepaper"]
    assert len(published) == 1
    assert published[0] is not None


async def test_killed_after_publish_before_marking(
    database_url: str, nats_url: str, event_bus: EventBus, event_names: EventNames
) -> None:
    stream, subject = await _prepare(event_bus, event_names)

    await _run_until("publish", "published", database_url, nats_url, subject, "doc-2")
    assert len(await _messages(event_bus, stream, subject)) == 1

    engine = create_engine(database_url)
    try:
        relay = OutboxRelay(event_bus, engine)
        # The row was never marked: the relay publishes it again, JetStream drops it.
        assert await relay.publish_all() == 1
        async with engine.connect() as conn:
            row = (await conn.execute(select(outbox.c.published_at, outbox.c.attempts))).one()
    finally:
        await engine.dispose()

    events = await _messages(event_bus, stream, subject)
    assert [e["document_id"] for e in events] == ["doc-2"]
    assert row.published_at is not None
    assert (await event_bus.manager.stream_info(stream.name)).state.messages == 1

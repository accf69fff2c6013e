"""The bus's JetStream state gauges against a real NATS JetStream server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from google.protobuf import struct_pb2
from prometheus_client import REGISTRY

from ledgerlens.runtime.events import ConsumerSpec, EventBus, EventContext, StreamSpec
from ledgerlens.runtime.testing import EventNames, eventually

pytestmark = pytest.mark.integration

EVENT = "ledgerlens.ledger.anchor.committed.v1"
PENDING = "ledgerlens_events_consumer_pending"
ACK_PENDING = "ledgerlens_events_consumer_ack_pending"
REDELIVERED = "ledgerlens_events_consumer_redelivered"
DEAD_LETTERS = "ledgerlens_events_dead_letter_messages"


@pytest_asyncio.fixture
async def bus(nats_url: str, event_names: EventNames) -> AsyncIterator[EventBus]:
    """A bus polling its consumers' state every 0.1 s (15 s in a service by default)."""
    bus = await EventBus.connect(
        nats_url, name=f"test-state-{event_names.token}", state_interval_seconds=0.1
    )
    try:
        yield bus
    finally:
        await bus.close(grace_seconds=5.0)


async def _declare(bus: EventBus, names: EventNames) -> tuple[StreamSpec, StreamSpec, str]:
    streams = names.platform_streams()
    await bus.ensure_stream(streams["LEDGER"])
    await bus.ensure_stream(streams["DEADLETTER"])
    return streams["LEDGER"], streams["DEADLETTER"], names.subject(EVENT)


def _consumer(names: EventNames, *, batch: int = 2, max_deliver: int = 3) -> ConsumerSpec:
    return names.consumer(
        ConsumerSpec(
            stream="LEDGER",
            durable="test-state",
            filter_subject=EVENT,
            ack_wait_seconds=30.0,
            max_deliver=max_deliver,
            batch=batch,
            backoff_base_seconds=0.05,
            backoff_max_seconds=0.05,
            fetch_timeout_seconds=0.5,
        )
    )


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _struct(doc: str) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update({"doc": doc})
    return message


async def _until_gauge(name: str, labels: dict[str, str], value: float) -> None:
    async def reached() -> bool:
        return _gauge(name, **labels) == value

    await eventually(reached, within=10, message=f"{name}{labels} == {value}")


async def test_pending_and_ack_pending_follow_the_consumer(
    bus: EventBus, event_names: EventNames
) -> None:
    stream, _, subject = await _declare(bus, event_names)
    spec = _consumer(event_names, batch=2)
    labels = {"stream": stream.name, "consumer": spec.durable}
    release = asyncio.Event()

    async def blocked(event: struct_pb2.Struct, ctx: EventContext) -> None:
        await release.wait()

    for n in range(5):
        await bus.publish(subject, _struct(str(n)), msg_id=f"m-{n}")
    await bus.subscribe(spec, struct_pb2.Struct, blocked)

    # one batch of 2 is delivered and not acked; 3 wait in the stream
    await _until_gauge(ACK_PENDING, labels, 2)
    await _until_gauge(PENDING, labels, 3)
    assert _gauge(REDELIVERED, **labels) == 0

    release.set()
    await _until_gauge(PENDING, labels, 0)
    await _until_gauge(ACK_PENDING, labels, 0)

    await bus.close(grace_seconds=5.0)
    assert _gauge(PENDING, **labels) is None, "a closed bus reports no consumer"


async def test_a_redelivered_message_shows_in_redelivered(
    bus: EventBus, event_names: EventNames
) -> None:
    stream, _, subject = await _declare(bus, event_names)
    spec = _consumer(event_names)
    labels = {"stream": stream.name, "consumer": spec.durable}
    release = asyncio.Event()

    async def fails_once_then_waits(event: struct_pb2.Struct, ctx: EventContext) -> None:
        if ctx.delivered == 1:
            raise ConnectionError("database briefly away")
        await release.wait()

    await bus.subscribe(spec, struct_pb2.Struct, fails_once_then_waits)
    await bus.publish(subject, _struct("a"), msg_id="m-1")

    await _until_gauge(REDELIVERED, labels, 1)
    assert _gauge(ACK_PENDING, **labels) == 1
    release.set()
    await _until_gauge(REDELIVERED, labels, 0)
    assert _gauge(ACK_PENDING, **labels) == 0


async def test_dead_letters_are_counted_in_the_dead_letter_stream(
    bus: EventBus, event_names: EventNames
) -> None:
    _, dlq, subject = await _declare(bus, event_names)
    spec = _consumer(event_names, max_deliver=2)

    async def broken(event: struct_pb2.Struct, ctx: EventContext) -> None:
        raise ValueError("cannot anchor")

    await bus.subscribe(spec, struct_pb2.Struct, broken)
    await _until_gauge(DEAD_LETTERS, {"stream": dlq.name}, 0)

    await bus.publish(subject, _struct("a"), msg_id="m-1")
    await _until_gauge(DEAD_LETTERS, {"stream": dlq.name}, 1)
    await bus.publish(subject, _struct("b"), msg_id="m-2")
    await _until_gauge(DEAD_LETTERS, {"stream": dlq.name}, 2)


async def test_a_failing_poll_keeps_the_service_running(
    bus: EventBus, event_names: EventNames, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer deleted behind the bus's back: its series go, nothing crashes, the
    failure is logged once as a warning."""
    stream, _, _ = await _declare(bus, event_names)
    spec = _consumer(event_names)
    labels = {"stream": stream.name, "consumer": spec.durable}

    async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
        return None

    subscription = await bus.subscribe(spec, struct_pb2.Struct, handler)
    await _until_gauge(PENDING, labels, 0)
    with caplog.at_level("DEBUG", logger="ledgerlens.runtime.events.bus"):
        await bus.manager.delete_consumer(spec.stream, spec.durable)

        async def gone() -> bool:
            return _gauge(PENDING, **labels) is None

        await eventually(gone, within=10, message="series of the deleted consumer removed")
        await asyncio.sleep(0.3)  # a few more failing polls
    warnings = [r for r in caplog.records if "reading JetStream state failed" in r.message]
    assert [r.levelname for r in warnings][:1] == ["WARNING"]
    assert all(r.levelname == "DEBUG" for r in warnings[1:])
    assert subscription.running
    await bus.close(grace_seconds=5.0)  # stops the poll without an error


async def test_close_stops_the_poll_task(nats_url: str, event_names: EventNames) -> None:
    bus = await EventBus.connect(nats_url, name=f"test-{event_names.token}")
    await _declare(bus, event_names)

    async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
        return None

    await bus.subscribe(_consumer(event_names), struct_pb2.Struct, handler)
    assert any(t.get_name().startswith("jetstream-state:") for t in asyncio.all_tasks())
    await bus.close(grace_seconds=5.0)
    assert not any(t.get_name().startswith("jetstream-state:") for t in asyncio.all_tasks())


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="state_interval_seconds"):
        EventBus(None, name="x", state_interval_seconds=0)  # type: ignore[arg-type]

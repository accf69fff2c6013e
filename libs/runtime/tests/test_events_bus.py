"""The event bus against a real NATS JetStream server."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from google.protobuf import struct_pb2, wrappers_pb2
from nats.js import api
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from ledgerlens.runtime.events import (
    HEADER_CONTENT_TYPE,
    HEADER_DLQ_DELIVERIES,
    HEADER_DLQ_ORIGINAL_MSG_ID,
    HEADER_DLQ_ORIGINAL_SUBJECT,
    HEADER_DLQ_REASON,
    HEADER_MSG_ID,
    HEADER_TYPE,
    STREAMS,
    ConsumerSpec,
    EventBus,
    EventContext,
    StreamSpec,
    dead_letter_subject,
)
from ledgerlens.runtime.testing import EventNames, PrivateNatsServer, eventually

pytestmark = pytest.mark.integration

EVENT = "ledgerlens.ledger.anchor.committed.v1"


def _struct(**fields: str) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(fields)
    return message


async def _declare(bus: EventBus, names: EventNames) -> tuple[StreamSpec, StreamSpec, str]:
    streams = names.platform_streams()
    await bus.ensure_stream(streams["LEDGER"])
    await bus.ensure_stream(streams["DEADLETTER"])
    return streams["LEDGER"], streams["DEADLETTER"], names.subject(EVENT)


def _consumer(names: EventNames, **overrides: float) -> ConsumerSpec:
    spec = ConsumerSpec(
        stream="LEDGER",
        durable="test-anchors",
        filter_subject=EVENT,
        ack_wait_seconds=overrides.pop("ack_wait_seconds", 5.0),
        max_deliver=int(overrides.pop("max_deliver", 3)),
        backoff_base_seconds=overrides.pop("backoff_base_seconds", 0.05),
        backoff_max_seconds=0.2,
        fetch_timeout_seconds=0.5,
    )
    return names.consumer(spec)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_duplicate_msg_id_is_stored_once(
    event_bus: EventBus, event_names: EventNames
) -> None:
    stream, _, subject = await _declare(event_bus, event_names)

    first = await event_bus.publish(subject, _struct(doc="a"), msg_id="anchor-1")
    again = await event_bus.publish(subject, _struct(doc="a"), msg_id="anchor-1")
    other = await event_bus.publish(subject, _struct(doc="b"), msg_id="anchor-2")

    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert other.seq == first.seq + 1
    info = await event_bus.manager.stream_info(stream.name)
    assert info.state.messages == 2
    stored = await event_bus.manager.get_msg(stream.name, first.seq)
    assert stored.headers is not None
    assert stored.headers[HEADER_MSG_ID] == "anchor-1"
    assert stored.headers[HEADER_CONTENT_TYPE] == "application/protobuf"
    assert stored.headers[HEADER_TYPE] == "google.protobuf.Struct"
    assert _metric("ledgerlens_events_published_total", subject=subject) == 3


async def test_success_is_acked_only_after_the_handler_returned(
    event_bus: EventBus, event_names: EventNames
) -> None:
    _, _, subject = await _declare(event_bus, event_names)
    spec = _consumer(event_names, ack_wait_seconds=1.0)
    seen: list[tuple[str, int, int]] = []

    async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
        info = await event_bus.manager.consumer_info(spec.stream, spec.durable)
        seen.append((event.fields["doc"].string_value, ctx.delivered, info.num_ack_pending))

    await event_bus.subscribe(spec, struct_pb2.Struct, handler)
    await event_bus.publish(subject, _struct(doc="a"), msg_id="m-1")

    async def acked() -> bool:
        info = await event_bus.manager.consumer_info(spec.stream, spec.durable)
        return bool(info.num_ack_pending == 0 and info.delivered.stream_seq == 1)

    await eventually(acked, message="ack")
    # Past the ack wait: an unacked message would have been redelivered by now.
    await asyncio.sleep(1.3)
    info = await event_bus.manager.consumer_info(spec.stream, spec.durable)
    assert seen == [("a", 1, 1)]  # while the handler ran, the message was still pending
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0
    assert _metric("ledgerlens_events_consumed_total", subject=subject, outcome="acked") == 1
    assert _metric("ledgerlens_event_handle_duration_seconds_count", subject=subject) == 1


async def test_failure_is_redelivered_then_succeeds(
    event_bus: EventBus, event_names: EventNames
) -> None:
    _, dlq, subject = await _declare(event_bus, event_names)
    spec = _consumer(event_names)
    deliveries: list[int] = []

    async def flaky(event: struct_pb2.Struct, ctx: EventContext) -> None:
        deliveries.append(ctx.delivered)
        if ctx.delivered == 1:
            raise ConnectionError("database briefly away")

    await event_bus.subscribe(spec, struct_pb2.Struct, flaky)
    await event_bus.publish(subject, _struct(doc="a"), msg_id="m-1")

    async def done() -> bool:
        return _metric("ledgerlens_events_consumed_total", subject=subject, outcome="acked") == 1

    await eventually(done, message="ack after retry")
    assert deliveries == [1, 2]
    assert _metric("ledgerlens_events_consumed_total", subject=subject, outcome="retried") == 1
    assert (await event_bus.manager.stream_info(dlq.name)).state.messages == 0


async def test_failing_handler_is_dead_lettered_after_max_deliver(
    event_bus: EventBus, event_names: EventNames, span_exporter: InMemorySpanExporter
) -> None:
    _, dlq, subject = await _declare(event_bus, event_names)
    spec = _consumer(event_names, max_deliver=3)
    deliveries: list[int] = []

    async def broken(event: struct_pb2.Struct, ctx: EventContext) -> None:
        deliveries.append(ctx.delivered)
        raise ValueError(f"cannot anchor {event['doc']}")

    await event_bus.subscribe(spec, struct_pb2.Struct, broken)
    original = _struct(doc="a")
    with trace.get_tracer("test").start_as_current_span("request") as request:
        await event_bus.publish(subject, original, msg_id="m-1")

    async def dead_lettered() -> bool:
        return (await event_bus.manager.stream_info(dlq.name)).state.messages == 1

    await eventually(dead_lettered, message="dead letter")
    letter = await event_bus.manager.get_last_msg(dlq.name, dead_letter_subject(subject))
    assert letter.subject == f"{event_names.root}.deadletter.ledger.anchor.committed.v1"
    assert letter.data == original.SerializeToString()
    assert letter.headers is not None
    assert letter.headers[HEADER_DLQ_REASON] == "ValueError: cannot anchor a"
    assert letter.headers[HEADER_DLQ_DELIVERIES] == "3"
    assert letter.headers[HEADER_DLQ_ORIGINAL_SUBJECT] == subject
    assert letter.headers[HEADER_DLQ_ORIGINAL_MSG_ID] == "m-1"
    assert letter.headers[HEADER_TYPE] == "google.protobuf.Struct"
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert letter.headers["traceparent"].split("-")[1] == trace_id

    async def settled() -> bool:
        info = await event_bus.manager.consumer_info(spec.stream, spec.durable)
        return bool(info.num_ack_pending == 0)

    await eventually(settled, message="terminated")
    await asyncio.sleep(0.5)  # longer than any backoff: no 4th delivery may follow
    assert deliveries == [1, 2, 3]
    consumed = "ledgerlens_events_consumed_total"
    assert _metric(consumed, subject=subject, outcome="retried") == 2
    assert _metric(consumed, subject=subject, outcome="dead_lettered") == 1


@pytest.mark.parametrize(
    ("payload", "type_name", "reason"),
    [
        (b"\x0a\xff\x01", "google.protobuf.Struct", "undecodable google.protobuf.Struct"),
        (
            wrappers_pb2.StringValue(value="x").SerializeToString(),
            "google.protobuf.StringValue",
            "type mismatch",
        ),
    ],
    ids=["undecodable", "wrong-type"],
)
async def test_unreadable_message_is_dead_lettered_at_once(
    event_bus: EventBus, event_names: EventNames, payload: bytes, type_name: str, reason: str
) -> None:
    _, dlq, subject = await _declare(event_bus, event_names)
    calls: list[struct_pb2.Struct] = []

    async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
        calls.append(event)

    await event_bus.subscribe(_consumer(event_names), struct_pb2.Struct, handler)
    await event_bus.publish_bytes(subject, payload, "m-1", {HEADER_TYPE: type_name})

    async def dead_lettered() -> bool:
        return (await event_bus.manager.stream_info(dlq.name)).state.messages == 1

    await eventually(dead_lettered, message="dead letter")
    letter = await event_bus.manager.get_last_msg(dlq.name, dead_letter_subject(subject))
    assert letter.data == payload
    assert letter.headers is not None
    assert letter.headers[HEADER_DLQ_REASON].startswith(reason)
    assert letter.headers[HEADER_DLQ_DELIVERIES] == "1"
    assert calls == []


async def test_trace_continues_from_publisher_to_handler(
    event_bus: EventBus, event_names: EventNames, span_exporter: InMemorySpanExporter
) -> None:
    _, _, subject = await _declare(event_bus, event_names)
    handled: asyncio.Future[trace.SpanContext] = asyncio.get_running_loop().create_future()

    async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
        handled.set_result(trace.get_current_span().get_span_context())

    await event_bus.subscribe(_consumer(event_names), struct_pb2.Struct, handler)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("client request") as request:
        await event_bus.publish(subject, _struct(doc="a"), msg_id="m-1")
    request_ctx = request.get_span_context()

    handler_ctx = await asyncio.wait_for(handled, timeout=10)
    assert handler_ctx.trace_id == request_ctx.trace_id
    assert handler_ctx.span_id != request_ctx.span_id

    async def exported() -> bool:
        return any(s.name == f"{subject} process" for s in span_exporter.get_finished_spans())

    await eventually(exported, message="process span exported")
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    publish, process = spans[f"{subject} publish"], spans[f"{subject} process"]
    assert publish.parent is not None
    assert publish.parent.span_id == request_ctx.span_id
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id
    assert process.kind == trace.SpanKind.CONSUMER


async def test_ensure_stream_is_idempotent_and_applies_changes(
    event_bus: EventBus, event_names: EventNames
) -> None:
    spec = event_names.stream(STREAMS["LEDGER"])
    created = await event_bus.ensure_stream(spec)
    again = await event_bus.ensure_stream(spec)
    assert again.config.subjects == created.config.subjects == list(spec.subjects)
    assert again.config.duplicate_window == 120.0

    subject = event_names.subject(EVENT)
    await event_bus.publish(subject, _struct(doc="a"), msg_id="m-1")
    extra = event_names.subject("ledgerlens.ledger.other.v1")
    changed = StreamSpec(
        name=spec.name,
        subjects=(*spec.subjects, event_names.subject("ledgerlens.audit.>")),
        duplicate_window_seconds=30.0,
        max_age_seconds=3600.0,
    )
    updated = await event_bus.ensure_stream(changed)
    assert updated.config.duplicate_window == 30.0
    assert updated.config.max_age == 3600.0
    assert len(updated.config.subjects or []) == 2
    assert updated.state.messages == 1  # an update keeps what is stored
    await event_bus.publish(extra, _struct(doc="b"), msg_id="m-2")
    audit = await event_bus.publish(
        event_names.subject("ledgerlens.audit.x.v1"), _struct(doc="c"), msg_id="m-3"
    )
    assert audit.stream == spec.name


async def test_ensure_consumer_is_idempotent_and_applies_changes(
    event_bus: EventBus, event_names: EventNames
) -> None:
    await _declare(event_bus, event_names)
    spec = _consumer(event_names)
    first = await event_bus.ensure_consumer(spec)
    second = await event_bus.ensure_consumer(spec)
    assert first.name == second.name == spec.durable
    assert second.config.filter_subject == spec.filter_subject
    assert second.config.ack_policy == api.AckPolicy.EXPLICIT
    changed = dataclasses.replace(spec, ack_wait_seconds=7.0, max_ack_pending=10)
    updated = await event_bus.ensure_consumer(changed)
    assert updated.config.ack_wait == 7.0
    assert updated.config.max_ack_pending == 10


async def test_stop_lets_the_in_flight_handler_finish(
    event_bus: EventBus, event_names: EventNames
) -> None:
    _, _, subject = await _declare(event_bus, event_names)
    spec = _consumer(event_names)
    started = asyncio.Event()
    finished: list[str] = []

    async def slow(event: struct_pb2.Struct, ctx: EventContext) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(event.fields["doc"].string_value)

    subscription = await event_bus.subscribe(spec, struct_pb2.Struct, slow)
    await event_bus.publish(subject, _struct(doc="a"), msg_id="m-1")
    await asyncio.wait_for(started.wait(), timeout=10)
    await subscription.stop()

    assert finished == ["a"]
    assert not subscription.running

    async def acked() -> bool:
        info = await event_bus.manager.consumer_info(spec.stream, spec.durable)
        return bool(info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1)

    await eventually(acked, message="in-flight message acked")


async def test_ready_follows_the_server(nats_server: PrivateNatsServer) -> None:
    bus = await EventBus.connect(nats_server.url, name="test-ready")
    try:
        assert await bus.ready()
        nats_server.stop()

        async def not_ready() -> bool:
            return not await bus.ready(timeout_seconds=0.5)

        await eventually(not_ready, message="not ready")
        nats_server.start()
        await eventually(bus.ready, message="ready again")
    finally:
        await bus.close(grace_seconds=1)


async def test_consumer_resumes_after_nats_restart(
    nats_server: PrivateNatsServer, event_names: EventNames
) -> None:
    bus = await EventBus.connect(nats_server.url, name="test-restart")
    try:
        _, _, subject = await _declare(bus, event_names)
        received: list[str] = []

        async def handler(event: struct_pb2.Struct, ctx: EventContext) -> None:
            received.append(event.fields["doc"].string_value)

        subscription = await bus.subscribe(_consumer(event_names), struct_pb2.Struct, handler)
        await bus.publish(subject, _struct(doc="before"), msg_id="m-1")

        async def got(count: int) -> bool:
            return len(received) >= count

        await eventually(lambda: got(1), message="first event")
        nats_server.restart()
        await eventually(bus.ready, message="reconnected")
        await bus.publish(subject, _struct(doc="after"), msg_id="m-2")
        await eventually(lambda: got(2), within=15, message="event after restart")
        assert received == ["before", "after"]
        assert subscription.running
    finally:
        await bus.close(grace_seconds=1)

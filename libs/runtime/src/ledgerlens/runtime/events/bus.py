"""The event bus: protobuf events over NATS JetStream.

Publishing sets ``Nats-Msg-Id`` (JetStream stores a message id once per duplicate
window), the W3C trace context (``traceparent``/``tracestate``), ``Content-Type:
application/protobuf`` and the message's full protobuf name (``Ledgerlens-Type``).

Consuming uses durable pull consumers. A handler's message is acked only after the
handler returned; a failure naks with an exponential delay; after
``ConsumerSpec.max_deliver`` failed deliveries (or at once, if the payload does not
decode) the message is published, with its headers and the failure, to
``<root>.deadletter.<rest of subject>`` and then terminated. A message is never
acked or terminated before it is either handled or stored in the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.manager import JetStreamManager
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ledgerlens.runtime.events.metrics import (
    EVENT_HANDLE_DURATION,
    EVENTS_CONSUMED,
    EVENTS_PUBLISHED,
    Outcome,
)
from ledgerlens.runtime.events.specs import ConsumerSpec, StreamSpec, dead_letter_subject

__all__ = [
    "CONTENT_TYPE_PROTOBUF",
    "HEADER_CONTENT_TYPE",
    "HEADER_DLQ_CONSUMER",
    "HEADER_DLQ_DELIVERIES",
    "HEADER_DLQ_ORIGINAL_MSG_ID",
    "HEADER_DLQ_ORIGINAL_SEQUENCE",
    "HEADER_DLQ_ORIGINAL_STREAM",
    "HEADER_DLQ_ORIGINAL_SUBJECT",
    "HEADER_DLQ_REASON",
    "HEADER_MSG_ID",
    "HEADER_TYPE",
    "EventBus",
    "EventContext",
    "Handler",
    "Subscription",
    "message_headers",
]

log = logging.getLogger(__name__)

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_CONTENT_TYPE = "Content-Type"
HEADER_TYPE = "Ledgerlens-Type"
CONTENT_TYPE_PROTOBUF = "application/protobuf"
HEADER_DLQ_REASON = "Ledgerlens-Dead-Letter-Reason"
HEADER_DLQ_DELIVERIES = "Ledgerlens-Dead-Letter-Deliveries"
HEADER_DLQ_CONSUMER = "Ledgerlens-Dead-Letter-Consumer"
HEADER_DLQ_ORIGINAL_SUBJECT = "Ledgerlens-Original-Subject"
HEADER_DLQ_ORIGINAL_STREAM = "Ledgerlens-Original-Stream"
HEADER_DLQ_ORIGINAL_SEQUENCE = "Ledgerlens-Original-Sequence"
HEADER_DLQ_ORIGINAL_MSG_ID = "Ledgerlens-Original-Msg-Id"

_TRACE_HEADERS = ("traceparent", "tracestate")
_MAX_HEADER_VALUE = 1024
_TRACER_NAME = "ledgerlens.runtime.events"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class EventContext:
    """What a handler knows about the delivery besides the decoded event."""

    subject: str
    msg_id: str | None
    #: 1 on the first delivery, n on the n-th.
    delivered: int
    stream: str
    stream_sequence: int
    published_at: datetime
    headers: Mapping[str, str]
    _msg: Msg = field(repr=False)

    async def in_progress(self) -> None:
        """Tell the server the handler is still working (resets the ack wait)."""
        await self._msg.in_progress()


Handler = Callable[[M, EventContext], Awaitable[None]]


def message_headers(message: Message) -> dict[str, str]:
    """The headers describing a protobuf payload (content type and full type name)."""
    return {
        HEADER_CONTENT_TYPE: CONTENT_TYPE_PROTOBUF,
        HEADER_TYPE: message.DESCRIPTOR.full_name,
    }


def _header_value(text: str) -> str:
    # NATS headers are line based: a newline in a value would corrupt the message.
    flat = " ".join(text.split())
    return flat[:_MAX_HEADER_VALUE]


class EventBus:
    """One NATS connection with JetStream; publishes events and runs consumers."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        name: str,
        tracer_provider: trace.TracerProvider | None = None,
        request_timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=request_timeout)
        self._jsm: JetStreamManager = nc.jsm(timeout=request_timeout)
        self.name = name
        self._tracer = trace.get_tracer(_TRACER_NAME, tracer_provider=tracer_provider)
        self._subscriptions: list[Subscription[Any]] = []
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        wait_seconds: float | None = 10.0,
        request_timeout: float = 5.0,
        reconnect_time_wait: float = 0.5,
    ) -> EventBus:
        """Connect to ``url`` (comma separated for a cluster) as client ``name``.

        Once connected the client reconnects forever (publishes wait for it up to their
        timeout). ``wait_seconds`` bounds the first connection; ``None`` waits forever.
        """

        async def error_cb(exc: Exception) -> None:
            log.warning("nats connection error (%s): %r", name, exc)

        async def disconnected_cb() -> None:
            log.info("nats disconnected (%s)", name)

        async def reconnected_cb() -> None:
            log.info("nats reconnected (%s)", name)

        connecting = nats.connect(
            servers=[server.strip() for server in url.split(",") if server.strip()],
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_time_wait,
            connect_timeout=min(2.0, wait_seconds or 2.0),
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
        )
        nc = await asyncio.wait_for(connecting, timeout=wait_seconds)
        return cls(nc, name=name, tracer_provider=tracer_provider, request_timeout=request_timeout)

    async def close(self, grace_seconds: float = 30.0) -> None:
        """Stop every consumer (in-flight handlers finish), then drain the connection."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(sub.stop(grace_seconds) for sub in self._subscriptions))
        self._subscriptions.clear()
        if self._nc.is_closed:
            return
        try:
            await self._nc.drain()
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("nats drain failed (%r); closing", exc)
            await self._nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connection(self) -> NatsClient:
        return self._nc

    @property
    def jetstream(self) -> JetStreamContext:
        return self._js

    @property
    def manager(self) -> JetStreamManager:
        return self._jsm

    async def ready(self, timeout_seconds: float = 2.0) -> bool:
        """For ``/readyz``: connected and the JetStream API answers."""
        if not self._nc.is_connected:
            return False
        try:
            await asyncio.wait_for(self._jsm.account_info(), timeout=timeout_seconds)
        except (TimeoutError, nats.errors.Error):
            return False
        return True

    # -- declarations ------------------------------------------------------------------

    async def ensure_stream(self, spec: StreamSpec) -> api.StreamInfo:
        """Create the stream, or update it to match ``spec``. Safe to call at every start."""
        config = spec.to_config()
        try:
            await self._jsm.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            try:
                return await self._jsm.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Another instance created it between our lookup and create.
                log.info("stream %s appeared concurrently; updating it", spec.name)
        return await self._jsm.update_stream(config)

    async def ensure_consumer(self, spec: ConsumerSpec) -> api.ConsumerInfo:
        """Create the durable consumer, or update it to match ``spec``."""
        # The create call is create-or-update for the fields a consumer may change.
        return await self._jsm.add_consumer(spec.stream, spec.to_config())

    # -- publishing --------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        message: Message,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout_seconds: float | None = None,
    ) -> api.PubAck:
        """Publish a protobuf event; JetStream stores ``msg_id`` once per duplicate window.

        The current trace context goes into the headers, so the consumer's span is part
        of the caller's trace.
        """
        merged = {**(headers or {}), **message_headers(message)}
        return await self.publish_bytes(
            subject, message.SerializeToString(), msg_id, merged, timeout_seconds=timeout_seconds
        )

    async def publish_bytes(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        *,
        parent: otel_context.Context | None = None,
        timeout_seconds: float | None = None,
    ) -> api.PubAck:
        """Publish an already serialised payload (the outbox relay uses this).

        ``parent`` is the trace context the publish span continues (default: current).
        """
        if not msg_id:
            raise ValueError("msg_id is required: it is what makes publishing idempotent")
        with self._tracer.start_as_current_span(
            f"{subject} publish",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.destination.name": subject,
                "messaging.message.id": msg_id,
            },
        ):
            sent = {k: v for k, v in (headers or {}).items() if k not in _TRACE_HEADERS}
            propagate.inject(sent)
            sent[HEADER_MSG_ID] = msg_id
            ack = await self._js.publish(subject, payload, timeout=timeout_seconds, headers=sent)
        EVENTS_PUBLISHED.labels(subject=subject).inc()
        if ack.duplicate:
            log.debug("duplicate %s on %s ignored by JetStream", msg_id, subject)
        return ack

    # -- consuming ---------------------------------------------------------------------

    async def subscribe(
        self,
        spec: ConsumerSpec,
        message_type: type[M],
        handler: Handler[M],
    ) -> Subscription[M]:
        """Declare the durable consumer and start a task that feeds ``handler``."""
        if self._closed:
            raise RuntimeError("event bus is closed")
        await self.ensure_consumer(spec)
        pull = await self._js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        subscription = Subscription(self, spec, pull, message_type, handler)
        self._subscriptions.append(subscription)
        subscription.start()
        return subscription

    @property
    def tracer(self) -> trace.Tracer:
        return self._tracer

    async def _dead_letter(
        self, msg: Msg, spec: ConsumerSpec, reason: str, delivered: int
    ) -> api.PubAck:
        meta = msg.metadata
        original = dict(msg.headers or {})
        headers = {k: v for k, v in original.items() if k != HEADER_MSG_ID}
        headers.update(
            {
                HEADER_DLQ_REASON: _header_value(reason),
                HEADER_DLQ_DELIVERIES: str(delivered),
                HEADER_DLQ_CONSUMER: spec.durable,
                HEADER_DLQ_ORIGINAL_SUBJECT: msg.subject,
                HEADER_DLQ_ORIGINAL_STREAM: meta.stream,
                HEADER_DLQ_ORIGINAL_SEQUENCE: str(meta.sequence.stream),
            }
        )
        if HEADER_MSG_ID in original:
            headers[HEADER_DLQ_ORIGINAL_MSG_ID] = original[HEADER_MSG_ID]
        # The id makes a retry after a crash between this publish and term() idempotent.
        dlq_id = f"dlq:{meta.stream}:{spec.durable}:{meta.sequence.stream}"
        headers[HEADER_MSG_ID] = dlq_id
        ack = await self._js.publish(dead_letter_subject(msg.subject), msg.data, headers=headers)
        EVENTS_PUBLISHED.labels(subject=dead_letter_subject(msg.subject)).inc()
        return ack


class Subscription(Generic[M]):
    """A running durable pull consumer. Stop it with :meth:`stop` (or ``EventBus.close``)."""

    def __init__(
        self,
        bus: EventBus,
        spec: ConsumerSpec,
        pull: JetStreamContext.PullSubscription,
        message_type: type[M],
        handler: Handler[M],
    ) -> None:
        self.spec = spec
        self._bus = bus
        self._pull = pull
        self._type = message_type
        self._type_name = message_type.DESCRIPTOR.full_name
        self._handler = handler
        self._stopping = False
        # True from the moment a fetch returned until its batch is settled: a stop then
        # waits instead of cancelling, so no handler is interrupted halfway.
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.spec.durable}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop fetching, let the in-flight handler finish (up to ``grace_seconds``)."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            if not self._busy:
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=grace_seconds)
            if not done:
                log.warning("consumer %s: handler still running, cancelling", self.spec.durable)
                task.cancel()
                await asyncio.wait({task})
        if task is not None and task.done() and not task.cancelled() and task.exception():
            log.error("consumer %s ended with %r", self.spec.durable, task.exception())
        try:
            await self._pull.unsubscribe()
        except (nats.errors.Error, ValueError) as exc:
            log.debug("consumer %s: unsubscribe: %r", self.spec.durable, exc)

    async def _run(self) -> None:
        spec = self.spec
        while not self._stopping:
            self._busy = False
            try:
                msgs = await self._pull.fetch(spec.batch, timeout=spec.fetch_timeout_seconds)
            except TimeoutError:  # nats.errors.TimeoutError included: nothing new
                continue
            except nats.errors.ConnectionClosedError:
                log.info("consumer %s: connection closed, stopping", spec.durable)
                return
            except nats.errors.Error as exc:
                # Reconnecting, server restarting, consumer being recreated: try again.
                log.warning("consumer %s: fetch failed: %r", spec.durable, exc)
                await asyncio.sleep(min(spec.fetch_timeout_seconds, 1.0))
                continue
            self._busy = True
            for index, msg in enumerate(msgs):
                if self._stopping:
                    # Hand the rest of the batch back now rather than after the ack wait.
                    for rest in msgs[index:]:
                        await rest.nak()
                    break
                await self._handle(msg)
        self._busy = False

    async def _handle(self, msg: Msg) -> None:
        spec = self.spec
        headers = dict(msg.headers or {})
        meta = msg.metadata
        delivered = meta.num_delivered
        subject = msg.subject
        parent = propagate.extract(headers)
        with self._bus.tracer.start_as_current_span(
            f"{subject} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": subject,
                "messaging.consumer.group.name": spec.durable,
                "messaging.message.id": headers.get(HEADER_MSG_ID, ""),
                "messaging.nats.delivered": delivered,
            },
        ) as span:
            event = self._decode(msg, headers, delivered)
            if isinstance(event, str):
                span.set_status(Status(StatusCode.ERROR, event))
                await self._give_up(msg, event, delivered)
                return
            ctx = EventContext(
                subject=subject,
                msg_id=headers.get(HEADER_MSG_ID),
                delivered=delivered,
                stream=meta.stream,
                stream_sequence=meta.sequence.stream,
                published_at=meta.timestamp,
                headers=headers,
                _msg=msg,
            )
            started = time.perf_counter()
            try:
                await self._handler(event, ctx)
            # A handler may fail in any way; every failure must become a nak or a
            # dead letter, never a crashed consumer or a lost message.
            except Exception as exc:  # noqa: BLE001
                EVENT_HANDLE_DURATION.labels(subject=subject).observe(time.perf_counter() - started)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                reason = f"{type(exc).__name__}: {exc}"
                if delivered >= spec.max_deliver:
                    await self._give_up(msg, reason, delivered)
                else:
                    delay = spec.backoff(delivered)
                    log.warning(
                        "consumer %s: %s delivery %d failed (%s); retry in %.1fs",
                        spec.durable,
                        subject,
                        delivered,
                        reason,
                        delay,
                    )
                    await msg.nak(delay=delay)
                    EVENTS_CONSUMED.labels(subject=subject, outcome=Outcome.RETRIED).inc()
                return
            EVENT_HANDLE_DURATION.labels(subject=subject).observe(time.perf_counter() - started)
            await msg.ack()
            EVENTS_CONSUMED.labels(subject=subject, outcome=Outcome.ACKED).inc()

    def _decode(self, msg: Msg, headers: Mapping[str, str], delivered: int) -> M | str:
        """The event, or why the message must go to the dead letter without a handler run."""
        declared = headers.get(HEADER_TYPE)
        if declared is not None and declared != self._type_name:
            return f"type mismatch: message is {declared}, consumer expects {self._type_name}"
        try:
            event = self._type.FromString(msg.data)
        except DecodeError as exc:
            return f"undecodable {self._type_name}: {exc}"
        if delivered > self.spec.max_deliver:
            # Earlier deliveries never reported back (consumer killed or ack wait
            # exceeded): a poison message must not take the consumer down forever.
            return f"no result after {delivered - 1} deliveries (max {self.spec.max_deliver})"
        return event

    async def _give_up(self, msg: Msg, reason: str, delivered: int) -> None:
        spec = self.spec
        try:
            await self._bus._dead_letter(msg, spec, reason, delivered)
        except (TimeoutError, nats.errors.Error) as exc:
            # Not stored anywhere yet: keep it in the stream and try again later.
            log.error("consumer %s: dead-lettering %s failed: %r", spec.durable, msg.subject, exc)
            await msg.nak(delay=spec.backoff(delivered))
            EVENTS_CONSUMED.labels(subject=msg.subject, outcome=Outcome.RETRIED).inc()
            return
        log.error("consumer %s: dead-lettered %s: %s", spec.durable, msg.subject, reason)
        await msg.term()
        EVENTS_CONSUMED.labels(subject=msg.subject, outcome=Outcome.DEAD_LETTERED).inc()

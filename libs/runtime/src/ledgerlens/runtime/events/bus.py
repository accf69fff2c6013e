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

While consumers run, a background task reads their state from JetStream every
``state_interval_seconds`` (one ``CONSUMER.INFO`` per consumer, one ``STREAM.INFO`` per
dead-letter stream) into the gauges of :mod:`ledgerlens.runtime.events.metrics`, so the
services expose what the NATS exporter would (see :meth:`EventBus.poll_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
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
from prometheus_client import Gauge

from ledgerlens.runtime.events.metrics import (
    CONSUMER_ACK_PENDING,
    CONSUMER_PENDING,
    CONSUMER_REDELIVERED,
    DEAD_LETTER_MESSAGES,
    EVENT_HANDLE_DURATION,
    EVENTS_CONSUMED,
    EVENTS_PUBLISHED,
    Outcome,
)
from ledgerlens.runtime.events.specs import ConsumerSpec, StreamSpec, dead_letter_subject

__all__ = [
    "CONTENT_TYPE_PROTOBUF",
    "DEFAULT_STATE_INTERVAL_SECONDS",
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

#: how often a bus with running consumers reads their JetStream state (seconds).
DEFAULT_STATE_INTERVAL_SECONDS = 15.0

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
        state_interval_seconds: float = DEFAULT_STATE_INTERVAL_SECONDS,
    ) -> None:
        if state_interval_seconds <= 0:
            raise ValueError("state_interval_seconds must be positive")
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=request_timeout)
        self._jsm: JetStreamManager = nc.jsm(timeout=request_timeout)
        self.name = name
        self._tracer = trace.get_tracer(_TRACER_NAME, tracer_provider=tracer_provider)
        self._subscriptions: list[Subscription[Any]] = []
        self._closed = False
        self._state_interval = state_interval_seconds
        self._state_task: asyncio.Task[None] | None = None
        #: dead-letter subject -> the stream that captures it (found once, then kept).
        self._dead_letter_streams: dict[str, str] = {}
        #: the label sets this bus set, removed again when it closes.
        self._reported_consumers: set[tuple[str, str]] = set()
        self._reported_dead_letters: set[str] = set()
        self._state_failing = False

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
        state_interval_seconds: float = DEFAULT_STATE_INTERVAL_SECONDS,
    ) -> EventBus:
        """Connect to ``url`` (comma separated for a cluster) as client ``name``.

        Once connected the client reconnects forever (publishes wait for it up to their
        timeout). ``wait_seconds`` bounds the first connection; ``None`` waits forever.
        ``state_interval_seconds``: how often the consumers' JetStream state is read into
        the gauges while consumers run (``ServiceSettings.events_state_interval_seconds``).
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
        return cls(
            nc,
            name=name,
            tracer_provider=tracer_provider,
            request_timeout=request_timeout,
            state_interval_seconds=state_interval_seconds,
        )

    async def close(self, grace_seconds: float = 30.0) -> None:
        """Stop every consumer (in-flight handlers finish), then drain the connection."""
        if self._closed:
            return
        self._closed = True
        await self._stop_state_poll()
        await asyncio.gather(*(sub.stop(grace_seconds) for sub in self._subscriptions))
        self._subscriptions.clear()
        self._clear_state_gauges()
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
        if self._state_task is None or self._state_task.done():
            self._state_task = asyncio.create_task(
                self._poll_state_forever(), name=f"jetstream-state:{self.name}"
            )
        return subscription

    # -- JetStream state -----------------------------------------------------------------

    async def poll_state(self) -> None:
        """Read the running consumers' and their dead-letter streams' state into the gauges.

        Per running consumer ``(stream, durable)``: ``num_pending``, ``num_ack_pending``,
        ``num_redelivered``. Per dead-letter stream that captures a running consumer's
        ``dead_letter_subject`` (``DEADLETTER`` in production): its message count, all
        subjects (every service with consumers reports the same total; aggregate with
        ``max``). Never raises: a failed read keeps the gauge's last value (a scrape during
        a NATS blip shows the state from before it); a consumer or stream the server no
        longer has is removed from the gauges. The first failure is logged as a warning,
        repeats at debug, the recovery at info.
        """
        specs = {
            (sub.spec.stream, sub.spec.durable): sub.spec
            for sub in self._subscriptions
            if sub.running
        }
        failures: list[str] = []
        for key, spec in specs.items():
            try:
                info = await self._jsm.consumer_info(spec.stream, spec.durable)
            except nats.js.errors.NotFoundError:
                self._remove_consumer_gauges(key)
                failures.append(f"consumer {spec.stream}/{spec.durable} not found")
                continue
            except (TimeoutError, nats.errors.Error) as exc:
                failures.append(f"consumer {spec.stream}/{spec.durable}: {exc!r}")
                continue
            labels = {"stream": spec.stream, "consumer": spec.durable}
            CONSUMER_PENDING.labels(**labels).set(info.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(**labels).set(info.num_ack_pending or 0)
            CONSUMER_REDELIVERED.labels(**labels).set(info.num_redelivered or 0)
            self._reported_consumers.add(key)
        for stream in await self._dead_letter_stream_names(specs.values(), failures):
            try:
                stream_info = await self._jsm.stream_info(stream)
            except nats.js.errors.NotFoundError:
                self._forget_dead_letter_stream(stream)
                failures.append(f"dead-letter stream {stream} not found")
                continue
            except (TimeoutError, nats.errors.Error) as exc:
                failures.append(f"dead-letter stream {stream}: {exc!r}")
                continue
            DEAD_LETTER_MESSAGES.labels(stream=stream).set(stream_info.state.messages)
            self._reported_dead_letters.add(stream)
        self._report_state_poll(failures)

    async def _dead_letter_stream_names(
        self, specs: Iterable[ConsumerSpec], failures: list[str]
    ) -> list[str]:
        """The streams that capture the consumers' dead letters (looked up once each)."""
        for spec in specs:
            subject = dead_letter_subject(spec.filter_subject)
            if subject in self._dead_letter_streams:
                continue
            try:
                found = await self._jsm.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                # No dead-letter stream (yet): nothing to report; looked up again next time.
                continue
            except (TimeoutError, nats.errors.Error) as exc:
                failures.append(f"stream of {subject}: {exc!r}")
                continue
            self._dead_letter_streams[subject] = found
        return sorted(set(self._dead_letter_streams.values()))

    def _forget_dead_letter_stream(self, stream: str) -> None:
        for subject in [s for s, name in self._dead_letter_streams.items() if name == stream]:
            del self._dead_letter_streams[subject]
        if stream in self._reported_dead_letters:
            self._reported_dead_letters.discard(stream)
            _remove_labels(DEAD_LETTER_MESSAGES, stream)

    def _remove_consumer_gauges(self, key: tuple[str, str]) -> None:
        if key in self._reported_consumers:
            self._reported_consumers.discard(key)
            for gauge in (CONSUMER_PENDING, CONSUMER_ACK_PENDING, CONSUMER_REDELIVERED):
                _remove_labels(gauge, *key)

    def _clear_state_gauges(self) -> None:
        """Remove this bus's series: a closed bus reports no consumer state."""
        for key in list(self._reported_consumers):
            self._remove_consumer_gauges(key)
        for stream in list(self._reported_dead_letters):
            self._forget_dead_letter_stream(stream)

    def _report_state_poll(self, failures: list[str]) -> None:
        if failures and not self._state_failing:
            log.warning(
                "event bus %s: reading JetStream state failed (%s); keeping the last values",
                self.name,
                "; ".join(failures),
            )
        elif failures:
            log.debug("event bus %s: reading JetStream state failed: %s", self.name, failures)
        elif self._state_failing:
            log.info("event bus %s: reading JetStream state works again", self.name)
        self._state_failing = bool(failures)

    async def _poll_state_forever(self) -> None:
        me = asyncio.current_task()
        while True:
            if not self._nc.is_closed:
                try:
                    await self.poll_state()
                # The gauges are diagnostics: nothing in them may take the service down.
                except Exception:
                    log.exception("event bus %s: reading JetStream state failed", self.name)
            # nats-py turns a cancelled request into one of its own errors, which the poll
            # records as a failure: a stop that arrived meanwhile would be swallowed and
            # the loop would sleep on, so the pending cancellation is honoured here.
            if me is not None and me.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(self._state_interval)

    async def _stop_state_poll(self) -> None:
        task, self._state_task = self._state_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("event bus %s: state poll ended with %r", self.name, task.exception())

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


def _remove_labels(gauge: Gauge, *labels: str) -> None:
    # Another bus of the same process may have removed them already (tests).
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


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
        self._bus._remove_consumer_gauges((self.spec.stream, self.spec.durable))
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

"""Prometheus metrics of the event bus (default registry; dashboards use these names).

The counters and the histogram are observed as events flow. The gauges are JetStream's
own view of the service's durable consumers and of the dead-letter stream, read by the
bus every ``state_interval_seconds`` while its consumers run (see
``EventBus.poll_state``). Every replica of a service reports the same server-side state:
aggregate them with ``max``, never ``sum``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CONSUMER_ACK_PENDING",
    "CONSUMER_PENDING",
    "CONSUMER_REDELIVERED",
    "DEAD_LETTER_MESSAGES",
    "EVENTS_CONSUMED",
    "EVENTS_PUBLISHED",
    "EVENT_HANDLE_DURATION",
    "Outcome",
]

EVENTS_PUBLISHED = Counter(
    "ledgerlens_events_published_total",
    "Events accepted by JetStream (PubAck received), duplicates included.",
    ["subject"],
)

EVENTS_CONSUMED = Counter(
    "ledgerlens_events_consumed_total",
    "Event deliveries handled by a consumer, by outcome: acked (handler succeeded), "
    "retried (handler failed, nak with backoff), dead_lettered (moved to the dead-letter "
    "subject).",
    ["subject", "outcome"],
)

EVENT_HANDLE_DURATION = Histogram(
    "ledgerlens_event_handle_duration_seconds",
    "Time spent in an event handler, successful or not.",
    ["subject"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

CONSUMER_PENDING = Gauge(
    "ledgerlens_events_consumer_pending",
    "Messages of the stream matching a durable consumer's filter not yet delivered to it "
    "(JetStream num_pending), as last polled by a service running the consumer.",
    ["stream", "consumer"],
)

CONSUMER_ACK_PENDING = Gauge(
    "ledgerlens_events_consumer_ack_pending",
    "Messages delivered to a durable consumer and neither acked nor terminated yet "
    "(JetStream num_ack_pending).",
    ["stream", "consumer"],
)

CONSUMER_REDELIVERED = Gauge(
    "ledgerlens_events_consumer_redelivered",
    "Messages of a durable consumer awaiting an ack that were delivered more than once "
    "(JetStream num_redelivered).",
    ["stream", "consumer"],
)

DEAD_LETTER_MESSAGES = Gauge(
    "ledgerlens_events_dead_letter_messages",
    "Messages stored in a dead-letter stream (all subjects), as last polled by a service "
    "whose consumers dead-letter into it.",
    ["stream"],
)


class Outcome:
    ACKED = "acked"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"

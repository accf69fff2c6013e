"""Prometheus metrics of the event bus (default registry; dashboards use these names)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["EVENTS_CONSUMED", "EVENTS_PUBLISHED", "EVENT_HANDLE_DURATION", "Outcome"]

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


class Outcome:
    ACKED = "acked"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"

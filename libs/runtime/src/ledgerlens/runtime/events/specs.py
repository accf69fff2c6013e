"""What the platform's JetStream streams and durable consumers look like, as data.

This module is the one place the platform's streams and consumers are declared.
Services declare them idempotently at start (:meth:`EventBus.ensure_stream`,
:meth:`EventBus.subscribe`) and ``infra/nats/`` holds the same definitions as the
JSON that ``nats stream add --config`` / ``nats consumer add --config`` read; a test
fails when the two drift (regenerate with ``python -m ledgerlens.runtime.events.infra``).

Subjects follow ``ledgerlens.<domain>.<event>.v1``; each domain has one stream that
captures ``ledgerlens.<domain>.>``. A message a consumer gives up on goes to
``ledgerlens.deadletter.<domain>.<event>.v1`` (see :func:`dead_letter_subject`), kept
by the ``DEADLETTER`` stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.message import Message
from nats.js import api

from ledgerlens.events.v1 import events_pb2
from ledgerlens.options.v1 import event_pb2

__all__ = [
    "CONSUMERS",
    "DEAD_LETTER_DOMAIN",
    "STREAMS",
    "ConsumerSpec",
    "StreamSpec",
    "Subjects",
    "dead_letter_subject",
]

#: the second subject token of dead-lettered messages: ``<root>.deadletter.<rest>``.
DEAD_LETTER_DOMAIN = "deadletter"


def _json_ready(config: dict[str, Any]) -> dict[str, Any]:
    # nats-py's as_dict() keeps str-Enums; a JSON round trip turns them into plain
    # strings, so the dict compares equal to what a JSON file on disk decodes to.
    result: dict[str, Any] = json.loads(json.dumps(config))
    return result


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream: name, the subjects it captures and how long it keeps them."""

    name: str
    subjects: tuple[str, ...]
    description: str = ""
    #: messages published twice with the same ``Nats-Msg-Id`` within this window
    #: (seconds) are stored once. The outbox relay relies on it after a crash.
    duplicate_window_seconds: float = 120.0
    #: how long messages are kept (seconds); 0 keeps them until a limit is reached.
    max_age_seconds: float = 0.0
    max_bytes: int = -1
    max_msgs: int = -1
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1

    def to_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            description=self.description or None,
            subjects=list(self.subjects),
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            storage=api.StorageType(self.storage),
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_seconds,
            max_age=self.max_age_seconds,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            max_consumers=-1,
        )

    def to_json(self) -> dict[str, Any]:
        """The stream as JetStream API JSON (durations in ns), as ``nats stream add`` reads it."""
        return _json_ready(self.to_config().as_dict())


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer and how the bus treats its failures.

    ``max_deliver`` is enforced by the bus, not by the server: after that many failed
    deliveries the message goes to the dead-letter subject and is terminated. The
    server-side limit stays unlimited so that a message whose handler never returned
    (process killed, ack wait exceeded) is still dead-lettered instead of being
    dropped silently by the server.
    """

    stream: str
    durable: str
    filter_subject: str
    description: str = ""
    max_deliver: int = 5
    #: the server redelivers a message not acked within this many seconds.
    ack_wait_seconds: float = 30.0
    max_ack_pending: int = 1000
    #: messages fetched per pull request, and how long one pull waits (seconds).
    batch: int = 10
    fetch_timeout_seconds: float = 1.0
    #: nak delay after the n-th failed delivery: min(cap, base * 2 ** (n - 1)).
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    #: the server deletes the durable after this many seconds without a subscriber
    #: pulling from it; None keeps it forever (the platform's own consumers). For
    #: durables named after something short-lived, e.g. one pod.
    inactive_threshold_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise ValueError("max_deliver must be at least 1")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if self.inactive_threshold_seconds is not None and self.inactive_threshold_seconds <= 0:
            raise ValueError("inactive_threshold_seconds must be positive (or None)")

    def to_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            description=self.description or None,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_seconds,
            max_deliver=-1,
            filter_subject=self.filter_subject,
            max_ack_pending=self.max_ack_pending,
            replay_policy=api.ReplayPolicy.INSTANT,
            # seconds here; nats-py sends nanoseconds on the wire.
            inactive_threshold=self.inactive_threshold_seconds,
        )

    def to_json(self) -> dict[str, Any]:
        """The consumer as JetStream API JSON, as ``nats consumer add --config`` reads it."""
        config = _json_ready(self.to_config().as_dict())
        # nats-py sends 0 for unset durations; the CLI and server treat them as unset.
        for unset in ("idle_heartbeat", "inactive_threshold"):
            if config.get(unset) == 0:
                del config[unset]
        return config

    def backoff(self, delivered: int) -> float:
        """Seconds to wait before redelivering after the ``delivered``-th failed attempt."""
        # Hand-written: the attempt number comes from the server's delivery count,
        # not from an in-process retry loop, so tenacity's wait objects do not fit.
        exponent = max(delivered - 1, 0)
        if exponent > 62:
            return self.backoff_max_seconds
        delay: float = min(self.backoff_max_seconds, self.backoff_base_seconds * 2**exponent)
        return delay


def dead_letter_subject(subject: str) -> str:
    """``ledgerlens.ingestion.document.ingested.v1`` -> ``ledgerlens.deadletter.ingestion.…``.

    The root token is kept, so isolated test subjects (another root) dead-letter into
    their own namespace and never into the platform's ``DEADLETTER`` stream.
    """
    root, sep, rest = subject.partition(".")
    if not sep or not rest:
        raise ValueError(f"subject {subject!r} has no domain to dead-letter under")
    return f"{root}.{DEAD_LETTER_DOMAIN}.{rest}"


def subject_of(message_type: type[Message]) -> str:
    """The subject an event payload type is published on, read from its contract.

    Every payload in ``ledgerlens.events.v1`` declares ``ledgerlens.options.v1.event_subject``,
    so the contract is the one place that maps a message type to its subject.
    """
    options = message_type.DESCRIPTOR.GetOptions()
    subject: str = options.Extensions[event_pb2.event_subject]
    if not subject:
        raise ValueError(f"{message_type.DESCRIPTOR.full_name} declares no event_subject")
    return subject


class Subjects:
    """The platform's event subjects (``ledgerlens.<domain>.<event>.v1``), from the contracts."""

    IDENTITY_KEY_REVOKED = subject_of(events_pb2.ApiKeyRevoked)
    INGESTION_DOCUMENT_INGESTED = subject_of(events_pb2.DocumentIngested)
    INGESTION_DOCUMENT_DELETED = subject_of(events_pb2.DocumentDeleted)
    INGESTION_VERSION_RETIRED = subject_of(events_pb2.DocumentVersionRetired)
    INGESTION_CHUNKS_EMBEDDED = subject_of(events_pb2.ChunksEmbedded)
    INFERENCE_COMPLETION_RECORDED = subject_of(events_pb2.CompletionRecorded)
    LEDGER_ANCHOR_COMMITTED = subject_of(events_pb2.AnchorCommitted)
    LEDGER_AUDIT_COMMITTED = subject_of(events_pb2.AuditCommitted)


_WEEK = 7 * 24 * 3600.0


def _domain_stream(name: str, domain: str, description: str) -> StreamSpec:
    return StreamSpec(
        name=name,
        subjects=(f"ledgerlens.{domain}.>",),
        description=description,
        max_age_seconds=_WEEK,
    )


#: every stream of the platform, by name.
STREAMS: dict[str, StreamSpec] = {
    spec.name: spec
    for spec in (
        _domain_stream("IDENTITY", "identity", "identity events (API key revocations)"),
        _domain_stream("INGESTION", "ingestion", "documents, versions, chunks"),
        _domain_stream("INFERENCE", "inference", "completions recorded for audit and usage"),
        _domain_stream("LEDGER", "ledger", "anchors and answer audits committed on the ledger"),
        StreamSpec(
            name="DEADLETTER",
            subjects=(f"ledgerlens.{DEAD_LETTER_DOMAIN}.>",),
            description="messages consumers gave up on, with the failure in headers",
            max_age_seconds=4 * _WEEK,
        ),
    )
}


def _consumer(service: str, stream: str, subject: str) -> ConsumerSpec:
    event = subject.removeprefix("ledgerlens.").removesuffix(".v1").replace(".", "-")
    return ConsumerSpec(
        stream=stream,
        durable=f"{service}--{event}",
        filter_subject=subject,
        description=f"{service} consumes {subject}",
    )


#: every durable consumer of the platform (who consumes what, see ARCHITECTURE.md).
CONSUMERS: tuple[ConsumerSpec, ...] = (
    _consumer("ingestion", "LEDGER", Subjects.LEDGER_ANCHOR_COMMITTED),
    _consumer("retrieval", "INGESTION", Subjects.INGESTION_CHUNKS_EMBEDDED),
    _consumer("retrieval", "INGESTION", Subjects.INGESTION_DOCUMENT_DELETED),
    _consumer("retrieval", "INGESTION", Subjects.INGESTION_VERSION_RETIRED),
    _consumer("retrieval", "LEDGER", Subjects.LEDGER_ANCHOR_COMMITTED),
    _consumer("inference", "IDENTITY", Subjects.IDENTITY_KEY_REVOKED),
    _consumer("ledger", "INGESTION", Subjects.INGESTION_DOCUMENT_INGESTED),
    _consumer("ledger", "INFERENCE", Subjects.INFERENCE_COMPLETION_RECORDED),
)


def _check_declarations() -> None:
    for consumer in CONSUMERS:
        stream = STREAMS[consumer.stream]
        domain = stream.subjects[0].removesuffix(">")
        if not consumer.filter_subject.startswith(domain):
            raise AssertionError(f"{consumer.durable} filters outside stream {stream.name}")


_check_declarations()

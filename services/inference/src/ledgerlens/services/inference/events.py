"""What inference publishes (``inference.completion.recorded`` through the outbox) and
the handler of what it consumes (``identity.key.revoked``).

The event carries ids, counts, cost and sha256 digests of the prompt and answer; never
their text. It is written by :meth:`UsageStore.insert` in the transaction of the usage
row (so a crash loses neither), and the runtime's ``OutboxRelay`` (over
``schema.OUTBOX``) publishes it with ``Nats-Msg-Id = completion-recorded:<id>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.events import Subjects
from ledgerlens.runtime.events.bus import EventContext
from ledgerlens.services.inference.revocations import Revocations
from ledgerlens.services.inference.store import OutboxEvent, UsageRecord

__all__ = [
    "KINDS",
    "RevocationHandler",
    "completion_msg_id",
    "completion_recorded",
    "same_subject",
]

_log = logging.getLogger(__name__)

KINDS: dict[str, events_pb2.CompletionKind.ValueType] = {
    "chat": events_pb2.COMPLETION_KIND_CHAT,
    "answer": events_pb2.COMPLETION_KIND_ANSWER,
    "embed": events_pb2.COMPLETION_KIND_EMBED,
}


def same_subject(subject: str) -> str:
    """The platform's subject as it is (tests map subjects into a namespace of their own)."""
    return subject


def completion_msg_id(completion_id: str) -> str:
    return f"completion-recorded:{completion_id}"


def completion_recorded(
    record: UsageRecord,
    *,
    prompt_sha256: str,
    answer_sha256: str,
    cited_chunk_ids: Sequence[str] = (),
    subject: Callable[[str], str] = same_subject,
) -> OutboxEvent:
    occurred = Timestamp()
    occurred.FromDatetime(record.created_at)
    message = events_pb2.CompletionRecorded(
        completion_id=record.completion_id,
        kind=KINDS[record.kind],
        tenant_id=record.tenant_id,
        api_key_id=record.api_key_id,
        model=record.model,
        provider=record.provider,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cost_micro_usd=record.cost_micro_usd,
        prompt_sha256=prompt_sha256,
        answer_sha256=answer_sha256,
        cited_chunk_ids=list(cited_chunk_ids),
        cached=record.cached,
        occurred_at=occurred,
    )
    return OutboxEvent(
        subject(Subjects.INFERENCE_COMPLETION_RECORDED),
        message,
        completion_msg_id(record.completion_id),
    )


class RevocationHandler:
    """``identity.key.revoked``: the key's tokens are refused from now on (see
    ``revocations.py``). Idempotent, so a redelivery is harmless."""

    def __init__(self, revocations: Revocations) -> None:
        self.revocations = revocations

    async def __call__(self, event: events_pb2.ApiKeyRevoked, context: EventContext) -> None:
        revoked_at = (
            event.revoked_at.ToDatetime(tzinfo=UTC)
            if event.HasField("revoked_at")
            else datetime.now(UTC)
        )
        await self.revocations.revoke(event.key_id, event.tenant_id, revoked_at)
        _log.info(
            "api key %s of tenant %s revoked: refused from now on", event.key_id, event.tenant_id
        )

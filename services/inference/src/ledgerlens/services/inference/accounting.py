"""Token and cost accounting: every completion becomes one usage row and one
``CompletionRecorded`` event (same transaction, via the outbox).

* **Tokens**: the provider's usage when it reported one; otherwise counted locally
  (``tokens.py``) and marked ``estimated``.
* **Cost** in micro-USD (integers, so sums are exact). One unit end to end: prices are
  the configuration's :class:`ModelPrice`, integer micro-USD per 1,000 tokens, and
  ``prompt * input_per_1k + completion * output_per_1k`` is an exact integer in
  thousandths of a micro-USD, divided by 1,000 with the **one** rounding (half up) **once
  per request** (not per part), so a request's cost is the same however it is streamed.
  Cache hits (``cached=True``) cost 0; a model without a price (the local providers)
  costs 0.
* **Digests**: ``prompt_sha256`` is the sha256 of the exact prompt sent (canonical JSON
  of the messages, :func:`messages_sha256`; of the inputs for embeddings,
  :func:`texts_sha256`); ``answer_sha256`` of the answer text. No text is stored,
  logged or published.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel

from ledgerlens.runtime.outbox import OutboxRelay
from ledgerlens.services.inference.events import completion_recorded, same_subject
from ledgerlens.services.inference.model import Message, TokenUsage
from ledgerlens.services.inference.providers.config import ModelPrice
from ledgerlens.services.inference.store import (
    CompletionKindName,
    Granularity,
    UsageBucket,
    UsageRecord,
    UsageStore,
)
from ledgerlens.services.inference.tokens import (
    TokenCounter,
    count_messages,
    count_texts,
    default_counter,
)

__all__ = [
    "Accountant",
    "AccountingSettings",
    "Recorded",
    "cost_micro_usd",
    "messages_sha256",
    "resolve_usage",
    "sha256_hex",
    "texts_sha256",
]

_log = logging.getLogger(__name__)

#: prices are per this many tokens
_PER = 1_000


class AccountingSettings(BaseModel):
    #: a ``tokenizer.json`` for local counting; None: the bundled MiniLM tokenizer
    tokenizer_path: str | None = None


def cost_micro_usd(usage: TokenUsage, price: ModelPrice | None) -> int:
    """Exact cost in micro-USD, rounded half up once per request (integers only)."""
    if price is None:
        return 0
    thousandths = (
        usage.prompt_tokens * price.input_per_1k + usage.completion_tokens * price.output_per_1k
    )
    return (thousandths + _PER // 2) // _PER  # half up; token counts and prices are >= 0


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def messages_sha256(messages: Sequence[Message]) -> str:
    canonical = json.dumps(
        [{"role": m.role, "content": m.content} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return sha256_hex(canonical)


def texts_sha256(texts: Sequence[str]) -> str:
    return sha256_hex(json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")))


def resolve_usage(
    reported: TokenUsage | None,
    *,
    messages: Sequence[Message] = (),
    inputs: Sequence[str] = (),
    answer: str = "",
    counter: TokenCounter | None = None,
) -> TokenUsage:
    """The provider's usage, or a local count (``estimated=True``) when it gave none."""
    if reported is not None:
        return reported
    prompt = count_messages(messages, counter) if messages else 0
    prompt += count_texts(inputs, counter)
    completion = count_texts([answer], counter) if answer else 0
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What was accounted: fill the response's ``Usage`` from it."""

    record: UsageRecord
    usage: TokenUsage
    cost_micro_usd: int
    prompt_sha256: str
    answer_sha256: str
    #: False when ``completion_id`` had been recorded before (nothing new written)
    inserted: bool


class Accountant:
    """Accounts completions into a :class:`UsageStore` (row + outbox event)."""

    def __init__(
        self,
        store: UsageStore,
        *,
        relay: OutboxRelay | None = None,
        counter: TokenCounter | None = None,
        subject: Callable[[str], str] = same_subject,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self._relay = relay
        self._counter = counter
        self._subject = subject
        self._clock = clock

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = default_counter()
        return self._counter

    def measure(
        self,
        usage: TokenUsage | None,
        prices: ModelPrice | None,
        *,
        messages: Sequence[Message] = (),
        inputs: Sequence[str] = (),
        answer: str = "",
        cached: bool = False,
    ) -> tuple[TokenUsage, int]:
        """Usage and cost without recording (e.g. to send ``usage`` before ``final``)."""
        resolved = resolve_usage(
            usage, messages=messages, inputs=inputs, answer=answer, counter=self.counter
        )
        return resolved, 0 if cached else cost_micro_usd(resolved, prices)

    async def record(
        self,
        *,
        completion_id: str,
        kind: CompletionKindName,
        tenant_id: str,
        api_key_id: str,
        model: str,
        provider: str,
        usage: TokenUsage | None,
        prices: ModelPrice | None,
        messages: Sequence[Message] = (),
        inputs: Sequence[str] = (),
        answer: str = "",
        cached: bool = False,
        cited_chunk_ids: Sequence[str] = (),
        occurred_at: datetime | None = None,
    ) -> Recorded:
        """Account one completion: resolve usage (local count if ``usage`` is None),
        cost (0 if ``cached``), digests; write the usage row and the CompletionRecorded
        outbox event in one transaction. ``messages`` (chat/answer: the exact prompt
        sent) or ``inputs`` (embed) and ``answer`` are used only to hash and count.
        Idempotent per ``completion_id`` (``inserted=False`` on a repeat)."""
        resolved, cost = self.measure(
            usage, prices, messages=messages, inputs=inputs, answer=answer, cached=cached
        )
        prompt_digest = messages_sha256(messages) if messages else texts_sha256(inputs)
        answer_digest = sha256_hex(answer) if kind != "embed" else ""
        record = UsageRecord(
            completion_id=completion_id,
            kind=kind,
            tenant_id=tenant_id,
            api_key_id=api_key_id,
            model=model,
            provider=provider,
            prompt_tokens=resolved.prompt_tokens,
            completion_tokens=resolved.completion_tokens,
            cost_micro_usd=cost,
            cached=cached,
            estimated=resolved.estimated,
            created_at=occurred_at or self._clock(),
        )
        event = completion_recorded(
            record,
            prompt_sha256=prompt_digest,
            answer_sha256=answer_digest,
            cited_chunk_ids=cited_chunk_ids,
            subject=self._subject,
        )
        inserted = await self.store.insert(record, event, relay=self._relay)
        _log.debug(
            "accounted completion %s: model %s, %d+%d tokens, %d micro-USD%s",
            completion_id,
            model,
            resolved.prompt_tokens,
            resolved.completion_tokens,
            cost,
            "" if inserted else " (already recorded)",
        )
        return Recorded(record, resolved, cost, prompt_digest, answer_digest, inserted)

    async def usage(
        self,
        tenant_id: str,
        api_key_id: str | None,
        model: str | None,
        since: datetime,
        until: datetime,
        granularity: Granularity = "day",
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[UsageBucket]:
        """GetUsage rows (aggregated in SQL); see :meth:`UsageStore.usage`."""
        return await self.store.usage(
            tenant_id, api_key_id, model, since, until, granularity, limit=limit, offset=offset
        )

"""The inference gateway's domain metrics (``ledgerlens_inference_*``), in one place.

The names are part of the contract with ``infra/grafana`` (the ``ledgerlens-inference``
dashboard): renaming one breaks ``tests/observability``. Label values are small bounded
sets: provider and model names come from the providers configuration, every other label
from the fixed tuples below. Never an API key id, a tenant or prompt text.

* requests by outcome (:class:`RequestOutcome`, one per Chat, ChatStream, Embed, Answer
  and AnswerStream call);
* provider calls, their duration and fallbacks (recorded by ``router.py``);
* tokens and cost of what providers processed (:func:`record_completion`; replays and
  cache hits are accounted as completions of their own but spend nothing, so they are
  counted by the requests and cache counters instead);
* limiter refusals, cache lookups and moderation refusals.
"""

from __future__ import annotations

import asyncio
from typing import Literal, get_args

from prometheus_client import Counter, Histogram

from ledgerlens.runtime.errors import PermissionDenied, ResourceExhausted
from ledgerlens.runtime.metrics import DURATION_BUCKETS

__all__ = [
    "CACHE",
    "CACHES",
    "COST",
    "FALLBACKS",
    "LIMITS",
    "MODERATION_REFUSALS",
    "OUTCOMES",
    "PROVIDER_DURATION",
    "PROVIDER_REQUESTS",
    "RATE_LIMITED",
    "REQUESTS",
    "RPCS",
    "TOKENS",
    "Outcome",
    "RequestOutcome",
    "outcome_of",
    "record_completion",
    "record_refused_limit",
]

#: the completion RPCs (admit, run, settle) whose outcomes are counted
RPCS = ("Chat", "ChatStream", "Embed", "Answer", "AnswerStream")
Outcome = Literal[
    "ok",
    "cache_hit",
    "idempotent_replay",
    "refused_moderation",
    "limited",
    "cancelled",
    "error",
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
LimitScope = Literal["key", "tenant"]
LimitName = Literal["requests_per_minute", "tokens_per_minute", "tokens_per_day"]
LIMITS: tuple[LimitName, ...] = get_args(LimitName)
CacheName = Literal["response", "embeddings"]
CACHES: tuple[CacheName, ...] = get_args(CacheName)
ModerationSource = Literal["local", "provider"]

#: micro-USD per USD (accounting's integer unit)
_MICRO = 1_000_000

PROVIDER_REQUESTS = Counter(
    "ledgerlens_inference_provider_requests_total",
    "Provider calls (each retry counts) by outcome: ok, retryable_error or error.",
    ["provider", "model", "outcome"],
)
PROVIDER_DURATION = Histogram(
    "ledgerlens_inference_provider_duration_seconds",
    "Duration of one provider call (a stream: until its last delta).",
    ["provider", "model"],
    buckets=(*DURATION_BUCKETS, 30.0, 60.0, 120.0),
)
FALLBACKS = Counter(
    "ledgerlens_inference_fallbacks_total",
    "Moves from a failed provider to the next target of a fallback chain.",
    ["from_provider", "to_provider"],
)
REQUESTS = Counter(
    "ledgerlens_inference_requests_total",
    "Completion RPCs by outcome: ok, cache_hit, idempotent_replay, refused_moderation, "
    "limited, cancelled (the caller went away) or error (any other failure; the RPC "
    "histogram's code says which).",
    ["rpc", "outcome"],
)
TOKENS = Counter(
    "ledgerlens_inference_tokens_total",
    "Tokens processed by providers (prompt or completion), as accounted; replays and "
    "cache hits spend none.",
    ["provider", "model", "kind"],
)
COST = Counter(
    "ledgerlens_inference_cost_usd_total",
    "Cost in USD of provider completions, from accounting's integer micro-USD.",
    ["provider", "model"],
)
RATE_LIMITED = Counter(
    "ledgerlens_inference_rate_limited_total",
    "Requests refused by a limit (RESOURCE_EXHAUSTED), by scope and limit.",
    ["scope", "limit"],
)
CACHE = Counter(
    "ledgerlens_inference_cache_total",
    "Cache lookups by cache and result (response: one per cacheable request; "
    "embeddings: one per input text).",
    ["cache", "result"],
)
MODERATION_REFUSALS = Counter(
    "ledgerlens_inference_moderation_refusals_total",
    "Requests refused by the input moderation screen, by moderator source.",
    ["source"],
)

# Known label values start at 0 (Prometheus' advice for bounded labels): rate() and the
# dashboard see a series before its first event instead of "no data".
for _rpc in RPCS:
    for _outcome in OUTCOMES:
        REQUESTS.labels(_rpc, _outcome)
for _scope in get_args(LimitScope):
    for _limit in LIMITS:
        RATE_LIMITED.labels(_scope, _limit)
for _cache in CACHES:
    for _result in ("hit", "miss"):
        CACHE.labels(_cache, _result)
for _source in get_args(ModerationSource):
    MODERATION_REFUSALS.labels(_source)


def record_completion(
    provider: str, model: str, prompt_tokens: int, completion_tokens: int, cost_micro_usd: int
) -> None:
    """Tokens and cost of one accounted provider completion."""
    TOKENS.labels(provider, model, "prompt").inc(prompt_tokens)
    TOKENS.labels(provider, model, "completion").inc(completion_tokens)
    COST.labels(provider, model).inc(cost_micro_usd / _MICRO)


def record_refused_limit(scope: str, limit: str) -> None:
    """A limiter refusal; ``limit`` as limits.py names it ("requests per minute")."""
    RATE_LIMITED.labels(scope, limit.replace(" ", "_")).inc()


def outcome_of(error: BaseException) -> Outcome:
    if isinstance(error, PermissionDenied) and error.reason == "MODERATION_REFUSED":
        return "refused_moderation"
    if isinstance(error, ResourceExhausted):
        return "limited"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "error"


class RequestOutcome:
    """One completion RPC's outcome: ``ok`` unless a step marks it otherwise (the first
    mark wins) or the call fails; counted once, by :meth:`finish`, which a ``with`` block
    calls as it ends."""

    __slots__ = ("_done", "outcome", "rpc")

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self.outcome: Outcome = "ok"
        self._done = False

    def mark(self, outcome: Outcome) -> None:
        if self.outcome == "ok":
            self.outcome = outcome

    def finish(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        REQUESTS.labels(self.rpc, self.outcome if error is None else outcome_of(error)).inc()

    def __enter__(self) -> RequestOutcome:
        return self

    def __exit__(
        self, _type: type[BaseException] | None, error: BaseException | None, _tb: object
    ) -> None:
        """Counted when the block ends, by how it ended."""
        self.finish(error)

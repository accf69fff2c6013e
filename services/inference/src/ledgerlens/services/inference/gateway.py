"""The gateway's business flow, free of gRPC: every completion goes through the same
steps, in this order::

    moderation screen of the input      PermissionDenied with the reason
    limits check (key and tenant)       ResourceExhausted with retry info
    idempotency (same key: first result replayed; concurrent duplicates: provider once)
    response cache (deterministic requests only)
    router (aliases, retries, fallbacks; the caller's deadline bounds it)
    accounting (usage row + CompletionRecorded in one transaction, via the outbox)
    limits record (the reservation reconciled with the actual tokens)

Results are the contract's response messages, because idempotency replays and the
response cache store them serialized: a replayed or cached stream replays exactly the
events of the first one. Replays and cache hits are accounted as completions of their
own (a new ``completion_id`` in the usage row and event, ``cached=true``, cost 0) while
the response keeps the first result's ``completion_id``.

Usage is the provider's when it reports one, else counted locally (the same count for
a unary call and a stream of the same text), so a stream's usage equals the unary
call's for the same answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from google.protobuf.message import Message as ProtoMessage

from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.runtime.auth import Principal
from ledgerlens.runtime.errors import InvalidArgument, PermissionDenied, Unavailable
from ledgerlens.services.inference.accounting import Accountant, Recorded
from ledgerlens.services.inference.cache import ResponseCache
from ledgerlens.services.inference.idempotency import (
    Idempotency,
    idempotency_scope,
    pack_frames,
    request_fingerprint,
    unpack_frames,
)
from ledgerlens.services.inference.limits import RateLimiter, Reservation
from ledgerlens.services.inference.metrics import RequestOutcome, record_completion
from ledgerlens.services.inference.model import (
    ChatParams,
    Completion,
    Deadline,
    Delta,
    FinishReason,
    Message,
    TokenUsage,
)
from ledgerlens.services.inference.moderation import Moderator, screen
from ledgerlens.services.inference.providers.config import ModelPrice
from ledgerlens.services.inference.rag import Rag
from ledgerlens.services.inference.requests import (
    AnswerCall,
    ChatCall,
    EmbedCall,
    ModerateCall,
    UsageQuery,
)
from ledgerlens.services.inference.revocations import Revocations
from ledgerlens.services.inference.router import Router
from ledgerlens.services.inference.store import CompletionKindName, UsageBucket
from ledgerlens.services.inference.tokens import count_messages, count_texts

__all__ = ["ADMIN_SCOPE", "Caller", "Gateway"]

_log = logging.getLogger(__name__)

#: the scope that lets GetUsage read another tenant
ADMIN_SCOPE = "admin"

_FINISH: dict[FinishReason, inference_pb2.FinishReason.ValueType] = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "content_filter": inference_pb2.FINISH_REASON_CONTENT_FILTER,
}

R = TypeVar("R", bound=ProtoMessage)
E = TypeVar("E", inference_pb2.ChatStreamResponse, inference_pb2.AnswerStreamResponse)
S = TypeVar("S", inference_pb2.ChatStreamResponse, inference_pb2.AnswerStreamResponse)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the tenant and API key that limits and usage are counted against."""

    tenant_id: str
    api_key_id: str
    scopes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, principal: Principal | None) -> Caller:
        if principal is None:  # auth disabled (tests, tools): one anonymous admin caller
            return cls("dev", "anonymous", frozenset({ADMIN_SCOPE}))
        return cls(principal.tenant, principal.subject, principal.scopes)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_id() -> str:
    return uuid.uuid4().hex


def _parse(message_type: type[R], data: bytes) -> R:
    message = message_type()
    message.ParseFromString(data)
    return message


def _usage_proto(usage: TokenUsage, cost: int) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cost_micro_usd=cost,
        estimated=usage.estimated,
    )


def _token_usage(usage: inference_pb2.Usage) -> TokenUsage:
    return TokenUsage(usage.prompt_tokens, usage.completion_tokens, usage.estimated)


def _stream_parts(
    events: Sequence[inference_pb2.ChatStreamResponse | inference_pb2.AnswerStreamResponse],
) -> tuple[str, inference_pb2.Usage, inference_pb2.StreamFinal]:
    text = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
    usage = next((e.usage for e in events if e.HasField("usage")), inference_pb2.Usage())
    final = next((e.final for e in events if e.HasField("final")), inference_pb2.StreamFinal())
    return text, usage, final


def _mark_cached(events: list[S]) -> list[S]:
    """A replayed stream: the same events, cost 0 and ``final.cached``."""
    for event in events:
        if event.HasField("usage"):
            event.usage.cost_micro_usd = 0
        elif event.HasField("final"):
            event.final.cached = True
    return events


class Gateway:
    """Chat, ChatStream, Embed, Moderate, Answer, AnswerStream and GetUsage."""

    def __init__(
        self,
        *,
        router: Router,
        moderator: Moderator,
        limiter: RateLimiter,
        idempotency: Idempotency,
        cache: ResponseCache,
        accountant: Accountant,
        prices: Mapping[tuple[str, str], ModelPrice] | None = None,
        rag: Rag | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.router = router
        self.moderator = moderator
        self.limiter = limiter
        self.idempotency = idempotency
        self.cache = cache
        self.accountant = accountant
        self.prices: Mapping[tuple[str, str], ModelPrice] = dict(prices or {})
        self.rag = rag
        self.revocations = revocations if revocations is not None else Revocations()

    # ------------------------------------------------------------------ shared steps

    def _authorize(self, caller: Caller) -> None:
        """UNAUTHENTICATED when the caller's API key was revoked (revocations.py)."""
        self.revocations.check(caller.api_key_id)

    @staticmethod
    def _namespace(caller: Caller, rpc: str) -> str:
        # per key, like idempotency: a key's cached answers never reach another key
        # (a revoked key's results stay with it), nor another tenant
        return f"{caller.tenant_id}/{caller.api_key_id}/{rpc}"

    def _target(self, model: str, kind: Literal["chat", "embed"], field: str) -> tuple[str, str]:
        """(provider, model) of the chain's first target; INVALID_ARGUMENT if unknown."""
        provider, name = self.router.resolve(model, kind=kind, field=field)[0]
        return provider.name, name

    async def _admit(self, caller: Caller, texts: Sequence[str], estimate: int) -> Reservation:
        self._authorize(caller)
        await screen(self.moderator, texts)
        return await self.limiter.check(caller.api_key_id, caller.tenant_id, estimate)

    async def _settle(self, reservation: Reservation, tokens: int | None) -> None:
        """Reconcile the reservation: actual tokens, or released (None: nothing ran)."""
        try:
            if tokens is None:
                await self.limiter.release(reservation)
            else:
                await self.limiter.record(reservation, tokens)
        except Exception:  # noqa: BLE001 - a limits hiccup must not fail a finished call
            _log.warning("could not reconcile a limits reservation", exc_info=True)

    async def _account(
        self,
        caller: Caller,
        kind: CompletionKindName,
        *,
        provider: str,
        model: str,
        usage: TokenUsage | None,
        messages: Sequence[Message] = (),
        inputs: Sequence[str] = (),
        answer: str = "",
        cached: bool = False,
        cited: Sequence[str] = (),
    ) -> Recorded:
        recorded = await self.accountant.record(
            completion_id=_new_id(),
            kind=kind,
            tenant_id=caller.tenant_id,
            api_key_id=caller.api_key_id,
            model=model,
            provider=provider,
            usage=usage,
            prices=None if cached else self.prices.get((provider, model)),
            messages=messages,
            inputs=inputs,
            answer=answer,
            cached=cached,
            cited_chunk_ids=cited,
        )
        if not cached:  # a replay or cache hit spent no provider tokens
            record_completion(
                provider,
                model,
                recorded.usage.prompt_tokens,
                recorded.usage.completion_tokens,
                recorded.cost_micro_usd,
            )
        return recorded

    async def _unary(
        self,
        caller: Caller,
        rpc: str,
        key: str,
        request: ProtoMessage,
        response_type: type[R],
        produce: Callable[[], Awaitable[R]],
        on_replay: Callable[[R], Awaitable[R]],
    ) -> R:
        """``produce`` once per idempotency key; a replay goes through ``on_replay``."""
        if not key:
            return await produce()

        async def run() -> bytes:
            return (await produce()).SerializeToString()

        data, replayed = await self.idempotency.run(
            idempotency_scope(caller.tenant_id, caller.api_key_id, rpc),
            key,
            request_fingerprint(request),
            run,
        )
        response = response_type()
        response.ParseFromString(data)
        return await on_replay(response) if replayed else response

    async def _streamed(
        self,
        caller: Caller,
        rpc: str,
        key: str,
        request: ProtoMessage,
        event_type: type[E],
        source: Callable[[], AsyncIterator[E]],
        on_replay: Callable[[list[E]], Awaitable[list[E]]],
    ) -> AsyncIterator[E]:
        """The events of ``source`` as they come; with an idempotency key the first
        stream's events are stored and a duplicate replays them."""
        if not key:
            async for event in source():
                yield event
            return
        queue: asyncio.Queue[E | None] = asyncio.Queue()

        async def produce() -> bytes:
            frames = []
            async for event in source():
                frames.append(event.SerializeToString())
                queue.put_nowait(event)
            return pack_frames(frames)

        task = asyncio.create_task(
            self.idempotency.run(
                idempotency_scope(caller.tenant_id, caller.api_key_id, rpc),
                key,
                request_fingerprint(request),
                produce,
            )
        )
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                yield item
            data, replayed = await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if replayed:
            events = [_parse(event_type, frame) for frame in unpack_frames(data)]
            for replay in await on_replay(events):
                yield replay

    async def _settled_unary(
        self,
        admit: Callable[[], Awaitable[Reservation]],
        caller: Caller,
        rpc: str,
        key: str,
        request: ProtoMessage,
        response_type: type[R],
        once: Callable[[], Awaitable[tuple[R, int]]],
        on_replay: Callable[[R], Awaitable[R]],
    ) -> R:
        """Admit, then :meth:`_unary` over ``once`` (a response and the tokens it
        spent); the reservation is settled with those tokens, or released."""
        with RequestOutcome(rpc) as outcome:
            reservation = await admit()
            spent: int | None = None
            try:

                async def produce() -> R:
                    nonlocal spent
                    response, spent = await once()
                    if getattr(response, "cached", False):  # fresh, yet cached: a cache hit
                        outcome.mark("cache_hit")
                    return response

                async def replay(response: R) -> R:
                    outcome.mark("idempotent_replay")
                    return await on_replay(response)

                return await self._unary(caller, rpc, key, request, response_type, produce, replay)
            finally:
                await self._settle(reservation, spent)

    async def _settled_stream(
        self,
        admit: Callable[[], Awaitable[Reservation]],
        caller: Caller,
        rpc: str,
        key: str,
        request: ProtoMessage,
        event_type: type[E],
        source: Callable[[Callable[[int], None]], AsyncIterator[E]],
        on_replay: Callable[[list[E]], Awaitable[list[E]]],
    ) -> AsyncIterator[E]:
        """Admit, then :meth:`_streamed` over ``source``, which reports the tokens it
        spent through the callback it is given; settled like :meth:`_settled_unary`."""
        with RequestOutcome(rpc) as outcome:
            reservation = await admit()
            spent: int | None = None

            def spend(tokens: int) -> None:
                nonlocal spent
                spent = tokens

            async def replay(events: list[E]) -> list[E]:
                outcome.mark("idempotent_replay")
                return await on_replay(events)

            try:
                async for event in self._streamed(
                    caller, rpc, key, request, event_type, lambda: source(spend), replay
                ):
                    if event.HasField("final") and event.final.cached:
                        outcome.mark("cache_hit")  # a replay was marked before its events
                    yield event
            finally:
                await self._settle(reservation, spent)

    def _estimate(self, messages: Sequence[Message], max_tokens: int | None) -> int:
        # counting tokens locally costs CPU on every call: only when a limit reads it
        if not self.limiter.counts_tokens:
            return 0
        return count_messages(messages) + (max_tokens or 0)

    @staticmethod
    def _params(model: str, messages: Sequence[Message], call: ChatCall | AnswerCall) -> ChatParams:
        # the cache key's params: the model as asked (alias or name), then the prompt
        return ChatParams(
            model=model,
            messages=tuple(messages),
            temperature=call.temperature,
            max_tokens=call.max_tokens,
            stop=call.stop if isinstance(call, ChatCall) else (),
        )

    # ------------------------------------------------------------------ chat

    async def _chat_admit(self, caller: Caller, call: ChatCall, path: str) -> Reservation:
        self._target(call.model, "chat", f"{path}model")
        return await self._admit(
            caller,
            [m.content for m in call.messages],
            self._estimate(call.messages, call.max_tokens),
        )

    async def chat(
        self, caller: Caller, call: ChatCall, request: inference_pb2.ChatRequest, deadline: Deadline
    ) -> inference_pb2.ChatResponse:
        return await self._settled_unary(
            lambda: self._chat_admit(caller, call, ""),
            caller,
            "Chat",
            call.idempotency_key,
            request,
            inference_pb2.ChatResponse,
            lambda: self._chat_once(caller, call, deadline),
            lambda r: self._replayed_chat(caller, call, r),
        )

    async def _chat_once(
        self, caller: Caller, call: ChatCall, deadline: Deadline
    ) -> tuple[inference_pb2.ChatResponse, int]:
        params = self._params(call.model, call.messages, call)
        namespace = self._namespace(caller, "Chat")
        cached = await self.cache.get_chat(params, namespace)
        if cached is not None:
            hit = _parse(inference_pb2.ChatResponse, cached)
            return await self._replayed_chat(caller, call, hit), 0
        completion = await self.router.chat(
            call.model,
            call.messages,
            deadline=deadline,
            temperature=call.temperature,
            max_tokens=call.max_tokens,
            stop=call.stop,
        )
        recorded = await self._account(
            caller,
            "chat",
            provider=completion.provider,
            model=completion.model,
            usage=completion.usage,
            messages=call.messages,
            answer=completion.text,
        )
        response = inference_pb2.ChatResponse(
            completion_id=recorded.record.completion_id,
            message=inference_pb2.ChatMessage(
                role=inference_pb2.ROLE_ASSISTANT, content=completion.text
            ),
            finish_reason=_FINISH[completion.finish_reason],
            model=completion.model,
            provider=completion.provider,
            usage=_usage_proto(recorded.usage, recorded.cost_micro_usd),
        )
        await self.cache.put_chat(params, namespace, response.SerializeToString())
        return response, recorded.usage.total_tokens

    async def _replayed_chat(
        self, caller: Caller, call: ChatCall, response: inference_pb2.ChatResponse
    ) -> inference_pb2.ChatResponse:
        await self._account(
            caller,
            "chat",
            provider=response.provider,
            model=response.model,
            usage=_token_usage(response.usage),
            messages=call.messages,
            answer=response.message.content,
            cached=True,
        )
        response.cached = True
        response.usage.cost_micro_usd = 0
        return response

    def chat_stream(
        self,
        caller: Caller,
        call: ChatCall,
        request: inference_pb2.ChatStreamRequest,
        deadline: Deadline,
    ) -> AsyncIterator[inference_pb2.ChatStreamResponse]:
        async def source(
            spend: Callable[[int], None],
        ) -> AsyncIterator[inference_pb2.ChatStreamResponse]:
            params = self._params(call.model, call.messages, call)
            namespace = self._namespace(caller, "ChatStream")
            cached = await self.cache.get_chat(params, namespace)
            if cached is not None:
                spend(0)
                events = [
                    _parse(inference_pb2.ChatStreamResponse, f) for f in unpack_frames(cached)
                ]
                for event in await self._replayed_chat_events(caller, call, events):
                    yield event
                return
            frames: list[bytes] = []
            async for event in self._chat_events(caller, call, deadline):
                frames.append(event.SerializeToString())
                if event.HasField("usage"):
                    spend(event.usage.total_tokens)
                yield event
            await self.cache.put_chat(params, namespace, pack_frames(frames))

        return self._settled_stream(
            lambda: self._chat_admit(caller, call, "chat."),
            caller,
            "ChatStream",
            call.idempotency_key,
            request,
            inference_pb2.ChatStreamResponse,
            source,
            lambda events: self._replayed_chat_events(caller, call, events),
        )

    async def _chat_events(
        self, caller: Caller, call: ChatCall, deadline: Deadline
    ) -> AsyncIterator[inference_pb2.ChatStreamResponse]:
        target: list[str] = []
        parts: list[str] = []
        last = Delta()
        stream = self.router.stream(
            call.model,
            call.messages,
            deadline=deadline,
            temperature=call.temperature,
            max_tokens=call.max_tokens,
            stop=call.stop,
            on_target=lambda p, m: target.extend((p, m)),
        )
        async for delta in stream:
            if delta.text:
                parts.append(delta.text)
                yield inference_pb2.ChatStreamResponse(delta=delta.text)
            if delta.finish_reason is not None or delta.usage is not None:
                last = delta
        provider, model = target
        text = "".join(parts)
        recorded = await self._account(
            caller,
            "chat",
            provider=provider,
            model=model,
            usage=last.usage,
            messages=call.messages,
            answer=text,
        )
        yield inference_pb2.ChatStreamResponse(
            usage=_usage_proto(recorded.usage, recorded.cost_micro_usd)
        )
        yield inference_pb2.ChatStreamResponse(
            final=inference_pb2.StreamFinal(
                completion_id=recorded.record.completion_id,
                finish_reason=_FINISH[last.finish_reason or "stop"],
                model=model,
                provider=provider,
            )
        )

    async def _replayed_chat_events(
        self, caller: Caller, call: ChatCall, events: list[inference_pb2.ChatStreamResponse]
    ) -> list[inference_pb2.ChatStreamResponse]:
        text, usage, final = _stream_parts(events)
        await self._account(
            caller,
            "chat",
            provider=final.provider,
            model=final.model,
            usage=_token_usage(usage),
            messages=call.messages,
            answer=text,
            cached=True,
        )
        return _mark_cached(events)

    # ------------------------------------------------------------------ embed

    async def embed(
        self, caller: Caller, call: EmbedCall, deadline: Deadline
    ) -> inference_pb2.EmbedResponse:
        with RequestOutcome("Embed") as outcome:
            provider, model = self._target(call.model, "embed", "model")
            reservation = await self._admit(caller, call.inputs, count_texts(call.inputs))
            spent: int | None = None
            try:
                found = await self.cache.get_embeddings(f"{provider}/{model}", call.inputs)
                missing = [i for i, v in enumerate(found) if v is None]
                usage: TokenUsage | None = TokenUsage(0, 0)
                vectors: list[list[float] | None] = list(found)
                if missing:
                    texts = [call.inputs[i] for i in missing]
                    result = await self.router.embed(call.model, texts, deadline=deadline)
                    provider, model, usage = result.provider, result.model, result.usage
                    await self.cache.put_embeddings(f"{provider}/{model}", texts, result.vectors)
                    for i, vector in zip(missing, result.vectors, strict=True):
                        vectors[i] = vector
                recorded = await self._account(
                    caller,
                    "embed",
                    provider=provider,
                    model=model,
                    usage=usage,
                    inputs=[call.inputs[i] for i in missing] if missing else call.inputs,
                    cached=not missing,
                )
                spent = recorded.usage.total_tokens
                if not missing:
                    outcome.mark("cache_hit")
                dense = [v or [] for v in vectors]
                response = inference_pb2.EmbedResponse(
                    embeddings=[
                        inference_pb2.Embedding(index=i, values=v) for i, v in enumerate(dense)
                    ],
                    dimensions=len(dense[0]) if dense else 0,
                    model=model,
                    usage=_usage_proto(recorded.usage, recorded.cost_micro_usd),
                )
            finally:
                await self._settle(reservation, spent)
            return response

    # ------------------------------------------------------------------ moderate

    async def moderate(self, caller: Caller, call: ModerateCall) -> inference_pb2.ModerateResponse:
        self._authorize(caller)
        verdicts = await self.moderator.moderate(call.inputs)
        return inference_pb2.ModerateResponse(
            moderator=self.moderator.name,
            results=[
                inference_pb2.ModerationResult(
                    index=v.index,
                    flagged=v.flagged,
                    reason=v.reason,
                    categories=[
                        inference_pb2.ModerationCategory(
                            category=c.category, score=c.score, flagged=c.flagged
                        )
                        for c in v.categories
                    ],
                )
                for v in verdicts
            ],
        )

    # ------------------------------------------------------------------ answer

    def _rag(self) -> Rag:
        if self.rag is None:
            raise Unavailable("answers are not configured on this gateway", reason="NO_RAG")
        return self.rag

    async def _answer_admit(self, caller: Caller, call: AnswerCall, path: str) -> Reservation:
        self._target(call.model, "chat", f"{path}model")
        self._rag().template(call.template)
        estimate = (
            count_texts([call.query]) + (call.max_tokens or 0) if self.limiter.counts_tokens else 0
        )
        return await self._admit(caller, [call.query], estimate)

    async def answer(
        self,
        caller: Caller,
        call: AnswerCall,
        request: inference_pb2.AnswerRequest,
        deadline: Deadline,
    ) -> inference_pb2.AnswerResponse:
        return await self._settled_unary(
            lambda: self._answer_admit(caller, call, ""),
            caller,
            "Answer",
            call.idempotency_key,
            request,
            inference_pb2.AnswerResponse,
            lambda: self._answer_once(caller, call, deadline),
            lambda r: self._replayed_answer(caller, call, r),
        )

    async def _answer_once(
        self, caller: Caller, call: AnswerCall, deadline: Deadline
    ) -> tuple[inference_pb2.AnswerResponse, int]:
        rag = self._rag()
        prepared = await rag.prepare(
            call.query, call.filter, call.top_k, call.template, deadline=deadline
        )
        params = self._params(call.model, prepared.messages, call)
        namespace = self._namespace(caller, "Answer")
        if prepared.passages:
            cached = await self.cache.get_chat(params, namespace)
            if cached is not None:
                hit = _parse(inference_pb2.AnswerResponse, cached)
                return await self._replayed_answer(caller, call, hit), 0
            completion = await self.router.chat(
                call.model,
                prepared.messages,
                deadline=deadline,
                temperature=call.temperature,
                max_tokens=call.max_tokens,
            )
            usage = completion.usage
        else:  # nothing retrieved: the template's reply, no provider call
            provider, model = self._target(call.model, "chat", "model")
            completion = Completion(prepared.no_passages_answer, "stop", None, model, provider)
            usage = TokenUsage(0, 0)
        citations, grounded = rag.citations(completion.text, prepared)
        recorded = await self._account(
            caller,
            "answer",
            provider=completion.provider,
            model=completion.model,
            usage=usage,
            messages=prepared.messages,
            answer=completion.text,
            cited=[c.chunk_id for c in citations],
        )
        response = inference_pb2.AnswerResponse(
            completion_id=recorded.record.completion_id,
            answer=completion.text,
            citations=citations,
            grounded=grounded,
            finish_reason=_FINISH[completion.finish_reason],
            model=completion.model,
            provider=completion.provider,
            template=prepared.template_ref,
            usage=_usage_proto(recorded.usage, recorded.cost_micro_usd),
        )
        if prepared.passages:
            await self.cache.put_chat(params, namespace, response.SerializeToString())
        return response, recorded.usage.total_tokens

    async def _replayed_answer(
        self, caller: Caller, call: AnswerCall, response: inference_pb2.AnswerResponse
    ) -> inference_pb2.AnswerResponse:
        await self._account(
            caller,
            "answer",
            provider=response.provider,
            model=response.model,
            usage=_token_usage(response.usage),
            inputs=[call.query],
            answer=response.answer,
            cached=True,
            cited=[c.chunk_id for c in response.citations],
        )
        response.cached = True
        response.usage.cost_micro_usd = 0
        return response

    def answer_stream(
        self,
        caller: Caller,
        call: AnswerCall,
        request: inference_pb2.AnswerStreamRequest,
        deadline: Deadline,
    ) -> AsyncIterator[inference_pb2.AnswerStreamResponse]:
        async def source(
            spend: Callable[[int], None],
        ) -> AsyncIterator[inference_pb2.AnswerStreamResponse]:
            async for event in self._answer_events(caller, call, deadline):
                if event.HasField("usage"):
                    spend(event.usage.total_tokens)
                yield event

        return self._settled_stream(
            lambda: self._answer_admit(caller, call, "answer."),
            caller,
            "AnswerStream",
            call.idempotency_key,
            request,
            inference_pb2.AnswerStreamResponse,
            source,
            lambda events: self._replayed_answer_events(caller, call, events),
        )

    async def _answer_events(
        self, caller: Caller, call: AnswerCall, deadline: Deadline
    ) -> AsyncIterator[inference_pb2.AnswerStreamResponse]:
        rag = self._rag()
        prepared = await rag.prepare(
            call.query, call.filter, call.top_k, call.template, deadline=deadline
        )
        params = self._params(call.model, prepared.messages, call)
        namespace = self._namespace(caller, "AnswerStream")
        parts: list[str] = []
        last = Delta(finish_reason="stop")
        if prepared.passages:
            cached = await self.cache.get_chat(params, namespace)
            if cached is not None:
                events = [
                    _parse(inference_pb2.AnswerStreamResponse, f) for f in unpack_frames(cached)
                ]
                for event in await self._replayed_answer_events(caller, call, events):
                    yield event
                return
            target: list[str] = []
            async for delta in self.router.stream(
                call.model,
                prepared.messages,
                deadline=deadline,
                temperature=call.temperature,
                max_tokens=call.max_tokens,
                on_target=lambda p, m: target.extend((p, m)),
            ):
                if delta.text:
                    parts.append(delta.text)
                    yield inference_pb2.AnswerStreamResponse(delta=delta.text)
                if delta.finish_reason is not None or delta.usage is not None:
                    last = delta
            provider, model = target
            usage = last.usage
        else:
            provider, model = self._target(call.model, "chat", "answer.model")
            parts.append(prepared.no_passages_answer)
            yield inference_pb2.AnswerStreamResponse(delta=prepared.no_passages_answer)
            usage = TokenUsage(0, 0)
        text = "".join(parts)
        citations, grounded = rag.citations(text, prepared)
        recorded = await self._account(
            caller,
            "answer",
            provider=provider,
            model=model,
            usage=usage,
            messages=prepared.messages,
            answer=text,
            cited=[c.chunk_id for c in citations],
        )
        tail = [
            inference_pb2.AnswerStreamResponse(
                citations=inference_pb2.CitationList(citations=citations, grounded=grounded)
            ),
            inference_pb2.AnswerStreamResponse(
                usage=_usage_proto(recorded.usage, recorded.cost_micro_usd)
            ),
            inference_pb2.AnswerStreamResponse(
                final=inference_pb2.StreamFinal(
                    completion_id=recorded.record.completion_id,
                    finish_reason=_FINISH[last.finish_reason or "stop"],
                    model=model,
                    provider=provider,
                    template=prepared.template_ref,
                )
            ),
        ]
        for event in tail:
            yield event
        if prepared.passages:
            frames = [
                inference_pb2.AnswerStreamResponse(delta=p).SerializeToString() for p in parts
            ]
            frames += [e.SerializeToString() for e in tail]
            await self.cache.put_chat(params, namespace, pack_frames(frames))

    async def _replayed_answer_events(
        self, caller: Caller, call: AnswerCall, events: list[inference_pb2.AnswerStreamResponse]
    ) -> list[inference_pb2.AnswerStreamResponse]:
        text, usage, final = _stream_parts(events)
        cited = next((e.citations for e in events if e.HasField("citations")), None)
        await self._account(
            caller,
            "answer",
            provider=final.provider,
            model=final.model,
            usage=_token_usage(usage),
            inputs=[call.query],
            answer=text,
            cached=True,
            cited=[c.chunk_id for c in cited.citations] if cited is not None else (),
        )
        return _mark_cached(events)

    # ------------------------------------------------------------------ usage

    async def usage(self, caller: Caller, query: UsageQuery) -> inference_pb2.GetUsageResponse:
        self._authorize(caller)
        tenant = query.tenant_id or caller.tenant_id
        if tenant != caller.tenant_id and ADMIN_SCOPE not in caller.scopes:
            raise PermissionDenied(
                "reading another tenant's usage needs the admin scope",
                reason="MISSING_SCOPE",
                metadata={"scope": ADMIN_SCOPE},
            )
        selection = _selection(tenant, query)
        offset = _page_offset(query.page_token, selection)
        buckets = await self.accountant.store.usage(
            tenant,
            query.api_key_id or None,
            query.model or None,
            query.start,
            query.end,
            query.granularity,  # type: ignore[arg-type]
            limit=query.page_size + 1,
            offset=offset,
        )
        total = await self.accountant.store.usage_total(
            tenant, query.api_key_id or None, query.model or None, query.start, query.end
        )
        more = len(buckets) > query.page_size
        page = buckets[: query.page_size]
        return inference_pb2.GetUsageResponse(
            rows=[_usage_row(b) for b in page],
            total=_usage_row(total),
            next_page_token=_page_token(offset + len(page), selection) if more else "",
        )


def _selection(tenant: str, query: UsageQuery) -> str:
    parts = [
        tenant,
        query.api_key_id,
        query.model,
        query.start.isoformat(),
        query.end.isoformat(),
        query.granularity,
    ]
    return _sha256("\x00".join(parts))[:16]


def _page_token(offset: int, selection: str) -> str:
    raw = json.dumps({"o": offset, "s": selection}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page_offset(token: str, selection: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, owner = int(data["o"]), str(data["s"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidArgument(
            "page_token is not a token this service issued",
            [("page_token", "malformed")],
        ) from exc
    if owner != selection or offset < 0:
        raise InvalidArgument(
            "page_token belongs to another selection",
            [("page_token", "must come from a call with the same selection")],
        )
    return offset


def _usage_row(bucket: UsageBucket) -> inference_pb2.UsageRow:
    row = inference_pb2.UsageRow(
        tenant_id=bucket.tenant_id,
        api_key_id=bucket.api_key_id,
        model=bucket.model,
        requests=bucket.requests,
        prompt_tokens=bucket.prompt_tokens,
        completion_tokens=bucket.completion_tokens,
        cost_micro_usd=bucket.cost_micro_usd,
    )
    if bucket.period_start is not None:
        row.period_start.FromDatetime(bucket.period_start)
    if bucket.period_end is not None:
        row.period_end.FromDatetime(bucket.period_end)
    return row

"""Validating inference requests: the contract's messages in, domain values out.

Every problem is collected and raised as one INVALID_ARGUMENT whose field violations
name each offending field by its path (``chat.messages[2].role``), with the limits the
contract documents (``protos/ledgerlens/inference/v1/inference.proto``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.errors import Violations
from ledgerlens.services.inference.model import Message, Role

__all__ = [
    "AnswerCall",
    "ChatCall",
    "EmbedCall",
    "ModerateCall",
    "UsageQuery",
    "parse_answer",
    "parse_chat",
    "parse_embed",
    "parse_moderate",
    "parse_usage",
]

MAX_MESSAGES = 256
MAX_CONVERSATION_CHARS = 200_000
MAX_TOKENS = 32_768
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_KEY_CHARS = 128
MAX_EMBED_INPUTS = 256
MAX_EMBED_CHARS = 8192
MAX_MODERATE_INPUTS = 32
MAX_MODERATE_CHARS = 32_768
MAX_QUERY_CHARS = 2000
MAX_ANSWER_TOP_K = 50
DEFAULT_ANSWER_TOP_K = 8
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
DEFAULT_USAGE_DAYS = 30

_ROLES: dict[int, Role] = {
    inference_pb2.ROLE_SYSTEM: "system",
    inference_pb2.ROLE_USER: "user",
    inference_pb2.ROLE_ASSISTANT: "assistant",
}
_GRANULARITIES = {
    inference_pb2.USAGE_GRANULARITY_UNSPECIFIED: "day",
    inference_pb2.USAGE_GRANULARITY_HOUR: "hour",
    inference_pb2.USAGE_GRANULARITY_DAY: "day",
    inference_pb2.USAGE_GRANULARITY_MONTH: "month",
}


@dataclass(frozen=True, slots=True)
class ChatCall:
    model: str
    messages: tuple[Message, ...]
    temperature: float | None
    max_tokens: int | None
    stop: tuple[str, ...]
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class EmbedCall:
    model: str
    inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModerateCall:
    inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AnswerCall:
    query: str
    #: passed on to retrieval.Search as it is (retrieval validates it)
    filter: retrieval_pb2.SearchFilter | None
    top_k: int
    model: str
    temperature: float | None
    max_tokens: int | None
    idempotency_key: str
    template: str


@dataclass(frozen=True, slots=True)
class UsageQuery:
    api_key_id: str
    tenant_id: str
    model: str
    start: datetime
    end: datetime
    granularity: str
    page_size: int
    page_token: str


def _temperature(
    request: inference_pb2.ChatRequest | inference_pb2.AnswerRequest, path: str, v: Violations
) -> float | None:
    if not request.HasField("temperature"):
        return None
    value = request.temperature
    if not math.isfinite(value) or not 0.0 <= value <= 2.0:
        v.add(f"{path}temperature", "must be in [0, 2]")
    return float(value)


def _max_tokens(value: int, path: str, v: Violations) -> int | None:
    if value == 0:
        return None
    if not 1 <= value <= MAX_TOKENS:
        v.add(f"{path}max_tokens", f"must be 1-{MAX_TOKENS}, or 0 for the model's default")
    return value


def _key(value: str, path: str, v: Violations) -> str:
    if value and (len(value) > MAX_KEY_CHARS or not value.isprintable()):
        v.add(f"{path}idempotency_key", f"must be 1-{MAX_KEY_CHARS} printable characters")
    return value


def _texts(values: Sequence[str], path: str, most: int, chars: int, v: Violations) -> None:
    if not values:
        v.add(path, "must hold at least one text")
    elif len(values) > most:
        v.add(path, f"must hold at most {most} texts, got {len(values)}")
    for i, text in enumerate(values):
        if not text.strip():
            v.add(f"{path}[{i}]", "must not be empty")
        elif len(text) > chars:
            v.add(f"{path}[{i}]", f"must be at most {chars} characters, got {len(text)}")


def chat_call(request: inference_pb2.ChatRequest, path: str, v: Violations) -> ChatCall:
    messages: list[Message] = []
    if not request.messages:
        v.add(f"{path}messages", "must hold at least one message")
    elif len(request.messages) > MAX_MESSAGES:
        v.add(f"{path}messages", f"must hold at most {MAX_MESSAGES} messages")
    total = 0
    for i, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            v.add(f"{path}messages[{i}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        if not message.content.strip():
            v.add(f"{path}messages[{i}].content", "must not be empty")
        total += len(message.content)
        messages.append(Message(role or "user", message.content))
    if total > MAX_CONVERSATION_CHARS:
        v.add(f"{path}messages", f"must be at most {MAX_CONVERSATION_CHARS} characters in all")
    if messages and messages[-1].role == "assistant":
        v.add(f"{path}messages", "must not end with an assistant message")
    if len(request.stop) > MAX_STOPS:
        v.add(f"{path}stop", f"must hold at most {MAX_STOPS} sequences")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            v.add(f"{path}stop[{i}]", f"must be 1-{MAX_STOP_CHARS} characters")
    return ChatCall(
        model=request.model.strip(),
        messages=tuple(messages),
        temperature=_temperature(request, path, v),
        max_tokens=_max_tokens(request.max_tokens, path, v),
        stop=tuple(request.stop),
        idempotency_key=_key(request.idempotency_key, path, v),
    )


def parse_chat(request: inference_pb2.ChatRequest, path: str = "") -> ChatCall:
    v = Violations()
    call = chat_call(request, path, v)
    v.raise_if_any("chat request")
    return call


def parse_embed(request: inference_pb2.EmbedRequest) -> EmbedCall:
    v = Violations()
    _texts(request.inputs, "inputs", MAX_EMBED_INPUTS, MAX_EMBED_CHARS, v)
    v.raise_if_any("embed request")
    return EmbedCall(model=request.model.strip(), inputs=tuple(request.inputs))


def parse_moderate(request: inference_pb2.ModerateRequest) -> ModerateCall:
    v = Violations()
    _texts(request.inputs, "inputs", MAX_MODERATE_INPUTS, MAX_MODERATE_CHARS, v)
    v.raise_if_any("moderate request")
    return ModerateCall(inputs=tuple(request.inputs))


def parse_answer(request: inference_pb2.AnswerRequest, path: str = "") -> AnswerCall:
    v = Violations()
    query = request.query.strip()
    if not query:
        v.add(f"{path}query", "must not be empty")
    elif len(query) > MAX_QUERY_CHARS:
        v.add(f"{path}query", f"must be at most {MAX_QUERY_CHARS} characters")
    top_k = request.top_k or DEFAULT_ANSWER_TOP_K
    if not 1 <= top_k <= MAX_ANSWER_TOP_K:
        v.add(f"{path}top_k", f"must be 1-{MAX_ANSWER_TOP_K}, or 0 for {DEFAULT_ANSWER_TOP_K}")
    template = request.template.strip()
    call = AnswerCall(
        query=query,
        filter=request.filter if request.HasField("filter") else None,
        top_k=top_k,
        model=request.model.strip(),
        temperature=_temperature(request, path, v),
        max_tokens=_max_tokens(request.max_tokens, path, v),
        idempotency_key=_key(request.idempotency_key, path, v),
        template=template,
    )
    v.raise_if_any("answer request")
    return call


def parse_usage(request: inference_pb2.GetUsageRequest, now: datetime) -> UsageQuery:
    v = Violations()
    end = v.timestamp(request, "end_time") or now
    start = v.timestamp(request, "start_time")
    if start is None:
        try:
            start = end - timedelta(days=DEFAULT_USAGE_DAYS)
        except OverflowError:  # an end_time in the first days of year 1
            v.add("end_time", f"must leave {DEFAULT_USAGE_DAYS} days before it, or set start_time")
            start = end
    if end <= start and not v:
        v.add("end_time", "must be after start_time")
    granularity = _GRANULARITIES.get(request.granularity)
    if granularity is None:
        v.add("granularity", "unknown granularity")
    page_size = request.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        v.add("page_size", f"must be 1-{MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}")
    v.raise_if_any("usage request")
    return UsageQuery(
        api_key_id=request.api_key_id.strip(),
        tenant_id=request.tenant_id.strip(),
        model=request.model.strip(),
        start=start,
        end=end,
        granularity=granularity or "day",
        page_size=page_size,
        page_token=request.page_token,
    )

"""The inference gRPC servicer: proto <-> domain, nothing else (the flow is in gateway.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc.aio

from ledgerlens.inference.v1 import inference_pb2, inference_pb2_grpc
from ledgerlens.runtime.auth import current_principal
from ledgerlens.services.inference.gateway import Caller, Gateway
from ledgerlens.services.inference.model import Deadline
from ledgerlens.services.inference.requests import (
    parse_answer,
    parse_chat,
    parse_embed,
    parse_moderate,
    parse_usage,
)

__all__ = ["InferenceApi"]

Context = grpc.aio.ServicerContext[Any, Any]


def _deadline(context: Context) -> Deadline:
    """The caller's gRPC deadline, which bounds every retry and fallback."""
    return Deadline.after(context.time_remaining())


def _caller() -> Caller:
    return Caller.of(current_principal())


class InferenceApi(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: Context
    ) -> inference_pb2.ChatResponse:
        call = parse_chat(request)
        return await self._gateway.chat(_caller(), call, request, _deadline(context))

    async def ChatStream(
        self, request: inference_pb2.ChatStreamRequest, context: Context
    ) -> AsyncIterator[inference_pb2.ChatStreamResponse]:
        call = parse_chat(request.chat, "chat.")
        async for event in self._gateway.chat_stream(_caller(), call, request, _deadline(context)):
            yield event

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        return await self._gateway.embed(_caller(), parse_embed(request), _deadline(context))

    async def Moderate(
        self, request: inference_pb2.ModerateRequest, context: Context
    ) -> inference_pb2.ModerateResponse:
        return await self._gateway.moderate(_caller(), parse_moderate(request))

    async def Answer(
        self, request: inference_pb2.AnswerRequest, context: Context
    ) -> inference_pb2.AnswerResponse:
        call = parse_answer(request)
        return await self._gateway.answer(_caller(), call, request, _deadline(context))

    async def AnswerStream(
        self, request: inference_pb2.AnswerStreamRequest, context: Context
    ) -> AsyncIterator[inference_pb2.AnswerStreamResponse]:
        call = parse_answer(request.answer, "answer.")
        async for event in self._gateway.answer_stream(
            _caller(), call, request, _deadline(context)
        ):
            yield event

    async def GetUsage(
        self, request: inference_pb2.GetUsageRequest, context: Context
    ) -> inference_pb2.GetUsageResponse:
        query = parse_usage(request, datetime.now(UTC))
        return await self._gateway.usage(_caller(), query)

"""Any OpenAI-compatible API (OpenAI, DeepSeek, vLLM, Ollama, text-embeddings-inference):
unary chat completions over httpx directly, streams and embeddings through the
``openai`` SDK.

A unary chat is the gateway's hot path, and the SDK cost about 1.3 ms of CPU a call
there (request transformation, its own client stack and response models; see
``bench/inference_gateway.py``), so it is one ``POST {base_url}/chat/completions``
with httpx and a JSON parse, with the SDK's error mapping reproduced: an HTTP status
>= 400 carries the body's ``error.message``, its status and ``Retry-After``; a body
that is not the documented shape is a malformed response (retryable).

The SDK's own retries are off (``max_retries=0``): the router retries, across providers,
within the caller's deadline. Each call is bounded by ``min(timeout_seconds, the
deadline's remaining time)``; a stream's every chunk is awaited at most that long.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import httpx
import openai
from openai import AsyncOpenAI

from ledgerlens.services.inference.model import (
    ChatParams,
    Completion,
    Deadline,
    Delta,
    EmbedResult,
    FinishReason,
    ProviderError,
    TokenUsage,
)
from ledgerlens.services.inference.providers.config import ProviderConfig

__all__ = ["OpenAICompatProvider", "parse_retry_after"]

#: statuses a retry (or another provider) may get past; every other 4xx is the request's
#: fault and surfaces at once
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
}
#: connections of one httpx pool (unary chat spreads calls over several; see __init__)
_POOL_SIZE = 16
# Raised by the SDK or by reading its (unvalidated) models when a body is not what the
# API promises: a missing field, a wrong type, a broken JSON document.
_MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI), or ``Retry-After`` as seconds or
    an HTTP date; ``None`` when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(body, str) and body:
        return body
    return exc.message


def _status_message(response: httpx.Response) -> str:
    """The reason of an error answer, as the SDK reads it: ``error.message`` of a JSON
    body, else the body's text, else the status."""
    try:
        body: Any = json.loads(response.content)
    except ValueError:
        body = response.text
    if isinstance(body, Mapping):
        body = body.get("error", body)
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(body, str) and body:
        return body
    return f"Error code: {response.status_code}"


class OpenAICompatProvider:
    """A :class:`~ledgerlens.services.inference.providers.base.Provider` over an
    OpenAI-compatible HTTP API."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        client: AsyncOpenAI | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if config.kind != "openai" or not config.base_url:
            raise ValueError(f"provider {config.name!r} is not an openai provider with base_url")
        self.name = config.name
        self.models: Sequence[str] = tuple(config.models)
        self.config = config
        self._timeout = config.timeout_seconds
        self._sem = asyncio.Semaphore(config.max_concurrency)
        # the SDK refuses to start without a key; local servers (vLLM, Ollama) take any
        api_key = config.resolved_api_key() or "unused"
        self._client = client or AsyncOpenAI(
            base_url=config.base_url,
            api_key=api_key,
            max_retries=0,
            timeout=config.timeout_seconds,
        )
        self._chat_url = config.base_url.rstrip("/") + "/chat/completions"
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        # httpcore's pool does work quadratic in its connections on every request
        # (at 200 open connections that was ~17 ms of CPU a call), so connections are
        # spread over small pools and a call takes the least busy one
        shards = 1 if http is not None else -(-config.max_concurrency // _POOL_SIZE)
        self._pools = [http] if http is not None else []
        for _ in range(shards - len(self._pools)):
            self._pools.append(
                httpx.AsyncClient(
                    timeout=config.timeout_seconds,
                    limits=httpx.Limits(
                        max_connections=_POOL_SIZE, max_keepalive_connections=_POOL_SIZE
                    ),
                )
            )
        self._busy = [0] * len(self._pools)

    # -- helpers -------------------------------------------------------------------

    def _budget(self, deadline: Deadline) -> float:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise ProviderError(self.name, "the deadline ran out", retryable=True)
        return min(self._timeout, remaining)

    def _map(self, exc: BaseException) -> ProviderError:
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, TimeoutError | openai.APITimeoutError | httpx.TimeoutException):
            return ProviderError(self.name, "timed out", retryable=True)
        if isinstance(exc, httpx.HTTPError):
            return ProviderError(
                self.name, f"connection error: {type(exc).__name__}: {exc}", retryable=True
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            retryable = status in _RETRYABLE_STATUS or status >= 500
            return ProviderError(
                self.name,
                _error_message(exc),
                retryable=retryable,
                status=status,
                retry_after=parse_retry_after(exc.response.headers),
            )
        if isinstance(exc, openai.APIConnectionError):
            return ProviderError(self.name, f"connection error: {exc.message}", retryable=True)
        if isinstance(exc, openai.APIError):  # an error event inside a stream, a bad body
            return ProviderError(self.name, exc.message, retryable=True)
        return ProviderError(
            self.name, f"malformed response: {type(exc).__name__}: {exc}", retryable=True
        )

    @staticmethod
    def _request(params: ChatParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": params.model,
            "messages": [{"role": m.role, "content": m.content} for m in params.messages],
        }
        if params.temperature is not None:
            kwargs["temperature"] = params.temperature
        if params.max_tokens is not None:
            kwargs["max_tokens"] = params.max_tokens
        if params.stop:
            kwargs["stop"] = list(params.stop)
        return kwargs

    def _status_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        return ProviderError(
            self.name,
            _status_message(response),
            retryable=status in _RETRYABLE_STATUS or status >= 500,
            status=status,
            retry_after=parse_retry_after(response.headers),
        )

    @staticmethod
    def _json_usage(usage: Any) -> TokenUsage | None:
        if usage is None:
            return None
        return TokenUsage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))

    @staticmethod
    def _usage(usage: Any) -> TokenUsage | None:
        if usage is None:
            return None
        return TokenUsage(int(usage.prompt_tokens), int(usage.completion_tokens or 0))

    # -- Provider --------------------------------------------------------------------

    async def chat(self, params: ChatParams, deadline: Deadline) -> Completion:
        budget = self._budget(deadline)
        body = json.dumps(self._request(params), ensure_ascii=False).encode()
        try:
            async with asyncio.timeout(budget), self._sem:
                shard = self._busy.index(min(self._busy))
                self._busy[shard] += 1
                try:
                    response = await self._pools[shard].post(
                        self._chat_url, content=body, headers=self._headers, timeout=budget
                    )
                finally:
                    self._busy[shard] -= 1
            if response.status_code >= 400:
                raise self._status_error(response)
            data = json.loads(response.content)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
            return Completion(
                text=text,
                finish_reason=_FINISH.get(str(choice.get("finish_reason")), "stop"),
                usage=self._json_usage(data.get("usage")),
                model=params.model,
                provider=self.name,
            )
        except (httpx.HTTPError, TimeoutError, *_MALFORMED) as exc:
            raise self._map(exc) from exc

    async def stream(self, params: ChatParams, deadline: Deadline) -> AsyncIterator[Delta]:
        budget = self._budget(deadline)
        try:
            async with asyncio.timeout(budget):
                await self._sem.acquire()
        except TimeoutError as exc:
            raise self._map(exc) from exc
        try:
            try:
                async with asyncio.timeout(budget):
                    chunks = await self._client.chat.completions.create(
                        **self._request(params),
                        stream=True,
                        stream_options={"include_usage": True},
                        timeout=budget,
                    )
            except (openai.OpenAIError, TimeoutError, *_MALFORMED) as exc:
                raise self._map(exc) from exc
            finish: FinishReason | None = None
            usage: TokenUsage | None = None
            iterator = chunks.__aiter__()
            try:
                while True:
                    try:
                        async with asyncio.timeout(self._budget(deadline)):
                            chunk = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    if chunk.usage is not None:
                        usage = self._usage(chunk.usage)
                    for choice in chunk.choices:
                        if choice.finish_reason is not None:
                            finish = _FINISH.get(str(choice.finish_reason), "stop")
                        text = choice.delta.content if choice.delta is not None else None
                        if text:
                            yield Delta(text=cast(str, text))
            except (openai.OpenAIError, TimeoutError, *_MALFORMED) as exc:
                raise self._map(exc) from exc
            finally:
                await chunks.close()
            if finish is None:
                raise ProviderError(
                    self.name, "malformed stream: it ended without a finish reason", retryable=True
                )
            yield Delta(finish_reason=finish, usage=usage)
        finally:
            self._sem.release()

    async def embed(self, texts: Sequence[str], model: str, deadline: Deadline) -> EmbedResult:
        budget = self._budget(deadline)
        try:
            async with asyncio.timeout(budget), self._sem:
                response = await self._client.embeddings.create(
                    model=model, input=list(texts), encoding_format="float", timeout=budget
                )
                data = sorted(response.data, key=lambda d: d.index)
                vectors = [[float(x) for x in d.embedding] for d in data]
                if len(vectors) != len(texts):
                    raise ValueError(f"{len(vectors)} embeddings for {len(texts)} inputs")
                usage = response.usage
                return EmbedResult(
                    vectors=vectors,
                    dimensions=len(vectors[0]) if vectors else 0,
                    usage=TokenUsage(int(usage.prompt_tokens), 0) if usage is not None else None,
                    model=model,
                    provider=self.name,
                )
        except (openai.OpenAIError, TimeoutError, *_MALFORMED) as exc:
            raise self._map(exc) from exc

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
        await self._client.close()

"""Any OpenAI-compatible ``/embeddings`` endpoint: text-embeddings-inference, vLLM, OpenAI."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Sequence

import httpx
import numpy as np
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ledgerlens.embedding.base import EmbeddingError, Tokenizer
from ledgerlens.embedding.tokenizer import HFTokenizer

__all__ = ["OpenAIEmbedder"]

_SUMMARY_CHARS = 300


class _Item(BaseModel):
    index: int
    embedding: list[float]


class _Response(BaseModel):
    data: list[_Item]


class _RetryableError(Exception):
    """A failure worth another attempt (429, 5xx, no connection, timeout)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIEmbedder:
    """Embeds by POSTing to ``{base_url}/embeddings`` in batches of ``batch_size``.

    ``base_url`` is the API root including ``/v1`` (as in the OpenAI SDK), e.g.
    ``http://text-embeddings-inference:80/v1``. 429, 5xx, connection errors and
    timeouts are retried with exponential backoff (``Retry-After`` honoured) up to
    ``max_retries`` times; anything else, or running out of retries, raises
    :class:`EmbeddingError`. Vectors are L2-normalised here whatever the server does.

    The HTTP connection pool belongs to the event loop that first uses it: create the
    embedder in the loop that will use it.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        dimensions: int,
        max_tokens: int,
        tokenizer: Tokenizer | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        timeout_seconds: float = 30.0,
        max_retries: int = 4,
        retry_backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.model = model
        self.dimensions = dimensions
        self.max_tokens = max_tokens
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else HFTokenizer.default()
        self.batch_size = batch_size
        self._attempts = max_retries + 1
        self._max_backoff = max_backoff_seconds
        self._backoff = wait_exponential_jitter(
            multiplier=retry_backoff_seconds, max=max_backoff_seconds, jitter=retry_backoff_seconds
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout_seconds)
        )
        self._url = str(self._client.base_url.join("embeddings"))

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one str")
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            vectors.extend(await self._embed_batch(list(texts[start : start + self.batch_size])))
        return vectors

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _embed_batch(self, batch: list[str]) -> list[list[float]]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_RetryableError),
            reraise=True,
        )
        try:
            return await retrying(self._request, batch)
        except _RetryableError as exc:
            raise EmbeddingError(
                f"embedding request to {self._url} failed {self._attempts} times, last: {exc}"
            ) from exc

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, _RetryableError) and error.retry_after is not None:
            return min(error.retry_after, self._max_backoff)
        return self._backoff(state)

    async def _request(self, batch: list[str]) -> list[list[float]]:
        body = {"model": self.model, "input": batch, "encoding_format": "float"}
        try:
            response = await self._client.post("embeddings", json=body)
        except httpx.TransportError as exc:
            raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == httpx.codes.TOO_MANY_REQUESTS or status >= 500:
            raise _RetryableError(
                f"HTTP {status}: {_summarise(response)}", retry_after=_retry_after(response)
            )
        if not response.is_success:
            raise EmbeddingError(
                f"{self._url} refused the request (HTTP {status}): {_summarise(response)}"
            )
        try:
            parsed = _Response.model_validate_json(response.content)
        except ValidationError as exc:
            raise EmbeddingError(
                f"{self._url} answered with an unexpected body: {_summarise(response)}"
            ) from exc
        return self._vectors(parsed, len(batch))

    def _vectors(self, parsed: _Response, expected: int) -> list[list[float]]:
        if len(parsed.data) != expected:
            raise EmbeddingError(
                f"{self._url} returned {len(parsed.data)} embeddings for {expected} inputs"
            )
        # Servers may answer out of order; `index` says which input a vector belongs to.
        by_index = {item.index: item.embedding for item in parsed.data}
        if sorted(by_index) != list(range(expected)):
            raise EmbeddingError(
                f"{self._url} returned indices {sorted(by_index)[:10]}... "
                f"instead of 0..{expected - 1}"
            )
        for index, vector in by_index.items():
            if len(vector) != self.dimensions:
                raise EmbeddingError(
                    f"{self._url} returned a {len(vector)}-dimensional vector for input "
                    f"{index}; model {self.model!r} is configured for {self.dimensions} "
                    "(check the dimensions setting and which model the server runs)"
                )
        array = np.array([by_index[i] for i in range(expected)], dtype=np.float64)
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if not np.isfinite(array).all() or not (norms > 0).all():
            raise EmbeddingError(f"{self._url} returned a zero or non-finite vector")
        normalised: list[list[float]] = (array / norms).tolist()
        return normalised


def _summarise(response: httpx.Response) -> str:
    """The error message of an OpenAI, TEI or vLLM error body, else the body's start."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
        if message:
            text = str(message)
    text = " ".join(text.split()) or "(empty body)"
    return text if len(text) <= _SUMMARY_CHARS else text[:_SUMMARY_CHARS] + "..."


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (either form the RFC allows), if the server sent one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)

"""OpenAIEmbedder against a real OpenAI-compatible HTTP server on a real socket."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from ledgerlens.embedding import (
    Embedder,
    EmbeddingError,
    EmbeddingSettings,
    HFTokenizer,
    OpenAIEmbedder,
    create_embedder,
)
from ledgerlens.runtime.net import free_port

pytestmark = pytest.mark.integration

DIMENSIONS = 8


def raw_vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """Deterministic and deliberately not normalised (the client must normalise)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i % len(digest)] - 127.5) * 3 for i in range(dimensions)]


def unit(vector: list[float]) -> list[float]:
    array = np.asarray(vector)
    result: list[float] = (array / np.linalg.norm(array)).tolist()
    return result


@dataclass
class Behaviour:
    """What the fake server does next; reset for every test."""

    fail_times: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    delay_times: int = 0
    delay_seconds: float = 0.0
    reverse: bool = False
    dimensions: int = DIMENSIONS
    drop_one: bool = False
    status_body: tuple[int, Any] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class FakeEmbeddingServer:
    """An OpenAI-style ``POST /v1/embeddings`` served by uvicorn in its own thread."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = FastAPI()
        app.post("/v1/embeddings")(self._embeddings)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _embeddings(self, request: Request) -> JSONResponse:
        b = self.behaviour
        body = await request.json()
        b.requests.append(body)
        b.headers.append(dict(request.headers))
        if b.delay_times > 0:
            b.delay_times -= 1
            await asyncio.sleep(b.delay_seconds)
        if b.fail_times > 0:
            b.fail_times -= 1
            headers = {"Retry-After": b.retry_after} if b.retry_after is not None else None
            return JSONResponse(
                {"error": {"message": "model is overloaded", "type": "server_error"}},
                status_code=b.fail_status,
                headers=headers,
            )
        if b.status_body is not None:
            return JSONResponse(b.status_body[1], status_code=b.status_body[0])
        data = [
            {"object": "embedding", "index": i, "embedding": raw_vector(text, b.dimensions)}
            for i, text in enumerate(body["input"])
        ]
        if b.reverse:
            data.reverse()
        if b.drop_one:
            data.pop()
        return JSONResponse(
            {"object": "list", "data": data, "model": body["model"], "usage": {"total_tokens": 1}}
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake embedding server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_process() -> Iterator[FakeEmbeddingServer]:
    server = FakeEmbeddingServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(server_process: FakeEmbeddingServer) -> FakeEmbeddingServer:
    server_process.behaviour = Behaviour()
    return server_process


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer.default()


def make_embedder(base_url: str, tokenizer: HFTokenizer, **kwargs: Any) -> OpenAIEmbedder:
    options: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2",
        "dimensions": DIMENSIONS,
        "max_tokens": 254,
        "batch_size": 4,
        "max_retries": 3,
        "retry_backoff_seconds": 0.01,
        "timeout_seconds": 5.0,
        **kwargs,
    }
    return OpenAIEmbedder(base_url=base_url, tokenizer=tokenizer, **options)


@pytest.fixture
async def embedder(
    server: FakeEmbeddingServer, tokenizer: HFTokenizer
) -> AsyncIterator[OpenAIEmbedder]:
    embedder = make_embedder(server.base_url, tokenizer)
    yield embedder
    await embedder.aclose()


TEXTS = [f"text number {i}: EIP-{1000 + i}" for i in range(10)]


async def test_is_an_embedder(embedder: OpenAIEmbedder) -> None:
    assert isinstance(embedder, Embedder)
    assert embedder.tokenizer.count("base fee") == 2


async def test_batches_and_normalises(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder
) -> None:
    vectors = await embedder.embed(TEXTS)
    assert [len(r["input"]) for r in server.behaviour.requests] == [4, 4, 2]
    assert [t for r in server.behaviour.requests for t in r["input"]] == TEXTS
    assert all(r["model"] == "all-MiniLM-L6-v2" for r in server.behaviour.requests)
    np.testing.assert_allclose(vectors, [unit(raw_vector(t)) for t in TEXTS], atol=1e-9)
    assert all(np.linalg.norm(v) == pytest.approx(1.0) for v in vectors)


async def test_empty_input_sends_nothing(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder
) -> None:
    assert await embedder.embed([]) == []
    assert server.behaviour.requests == []


async def test_order_restored_by_index(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder
) -> None:
    server.behaviour.reverse = True
    vectors = await embedder.embed(TEXTS)
    np.testing.assert_allclose(vectors, [unit(raw_vector(t)) for t in TEXTS], atol=1e-9)


@pytest.mark.parametrize("status", [503, 429, 500, 502])
async def test_retries_then_succeeds(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder, status: int
) -> None:
    server.behaviour.fail_times = 2
    server.behaviour.fail_status = status
    vectors = await embedder.embed(TEXTS[:3])
    assert len(server.behaviour.requests) == 3
    np.testing.assert_allclose(vectors, [unit(raw_vector(t)) for t in TEXTS[:3]], atol=1e-9)


async def test_honours_retry_after(server: FakeEmbeddingServer, embedder: OpenAIEmbedder) -> None:
    server.behaviour.fail_times = 1
    server.behaviour.fail_status = 429
    server.behaviour.retry_after = "0.3"
    started = time.monotonic()
    await embedder.embed(TEXTS[:1])
    assert time.monotonic() - started >= 0.3
    assert len(server.behaviour.requests) == 2


async def test_retries_a_timeout(server: FakeEmbeddingServer, tokenizer: HFTokenizer) -> None:
    server.behaviour.delay_times = 1
    server.behaviour.delay_seconds = 2.0
    embedder = make_embedder(server.base_url, tokenizer, timeout_seconds=0.3)
    try:
        vectors = await embedder.embed(TEXTS[:2])
    finally:
        await embedder.aclose()
    assert len(vectors) == 2
    assert len(server.behaviour.requests) == 2


async def test_persistent_500_gives_up(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder
) -> None:
    server.behaviour.fail_times = 100
    server.behaviour.fail_status = 500
    with pytest.raises(EmbeddingError, match=r"failed 4 times.*HTTP 500.*model is overloaded"):
        await embedder.embed(TEXTS[:2])
    assert len(server.behaviour.requests) == 4  # max_retries=3 after the first attempt


async def test_client_error_is_not_retried(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder
) -> None:
    server.behaviour.status_body = (
        400,
        {"error": {"message": "input must not be empty", "type": "invalid_request_error"}},
    )
    with pytest.raises(EmbeddingError, match=r"HTTP 400\): input must not be empty"):
        await embedder.embed([""])
    assert len(server.behaviour.requests) == 1


async def test_tei_style_error_body_is_summarised(
    server: FakeEmbeddingServer, embedder: OpenAIEmbedder
) -> None:
    server.behaviour.status_body = (413, {"error": "batch size 4 > maximum allowed batch size 2"})
    with pytest.raises(EmbeddingError, match="maximum allowed batch size"):
        await embedder.embed(TEXTS[:4])


async def test_wrong_dimensions(server: FakeEmbeddingServer, embedder: OpenAIEmbedder) -> None:
    server.behaviour.dimensions = DIMENSIONS * 2
    with pytest.raises(EmbeddingError, match=r"16-dimensional.*configured for 8"):
        await embedder.embed(TEXTS[:2])


async def test_wrong_count(server: FakeEmbeddingServer, embedder: OpenAIEmbedder) -> None:
    server.behaviour.drop_one = True
    with pytest.raises(EmbeddingError, match="returned 2 embeddings for 3 inputs"):
        await embedder.embed(TEXTS[:3])


async def test_unexpected_body(server: FakeEmbeddingServer, embedder: OpenAIEmbedder) -> None:
    server.behaviour.status_body = (200, {"embeddings": [[1.0, 2.0]]})
    with pytest.raises(EmbeddingError, match="unexpected body"):
        await embedder.embed(TEXTS[:1])


async def test_sends_the_api_key(server: FakeEmbeddingServer, tokenizer: HFTokenizer) -> None:
    embedder = make_embedder(server.base_url, tokenizer, api_key="sk-test-123")
    try:
        await embedder.embed(TEXTS[:1])
    finally:
        await embedder.aclose()
    assert server.behaviour.headers[-1]["authorization"] == "Bearer sk-test-123"


async def test_no_api_key_no_header(server: FakeEmbeddingServer, embedder: OpenAIEmbedder) -> None:
    await embedder.embed(TEXTS[:1])
    assert "authorization" not in server.behaviour.headers[-1]


async def test_connection_refused_is_retried_then_fails(tokenizer: HFTokenizer) -> None:
    embedder = make_embedder(f"http://127.0.0.1:{free_port()}/v1", tokenizer, max_retries=2)
    try:
        with pytest.raises(EmbeddingError, match=r"failed 3 times.*ConnectError"):
            await embedder.embed(TEXTS[:1])
    finally:
        await embedder.aclose()


async def test_create_embedder_openai(server: FakeEmbeddingServer) -> None:
    settings = EmbeddingSettings(
        provider="openai",
        base_url=server.base_url,
        api_key=SecretStr("secret-key"),
        dimensions=DIMENSIONS,
        batch_size=3,
        retry_backoff_seconds=0.01,
    )
    embedder = await create_embedder(settings)
    try:
        assert isinstance(embedder, OpenAIEmbedder)
        assert embedder.max_tokens == 254
        vectors = await embedder.embed(TEXTS[:5])
    finally:
        await embedder.aclose()
    np.testing.assert_allclose(vectors, [unit(raw_vector(t)) for t in TEXTS[:5]], atol=1e-9)
    assert [len(r["input"]) for r in server.behaviour.requests] == [3, 2]
    assert server.behaviour.headers[-1]["authorization"] == "Bearer secret-key"

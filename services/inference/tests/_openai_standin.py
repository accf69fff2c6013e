"""A protocol-level stand-in for an OpenAI-compatible provider: a real HTTP server
(FastAPI + uvicorn on its own thread and event loop, bound to 127.0.0.1:0).

Usage::

    from _openai_standin import OpenAIStandIn, Script

    with OpenAIStandIn() as standin:            # or `async with` (starts off the loop)
        standin.base_url                         # "http://127.0.0.1:<port>/v1"
        standin.script(Script.error(429, "slow down", retry_after=0.3), Script.ok("Hi."))
        ...                                      # call it with the openai SDK / httpx
        standin.calls()                          # chat calls received (int)
        standin.requests                         # list[Received]: path, body, headers

Endpoints: ``POST /v1/chat/completions`` (JSON, or SSE when ``stream: true``: a role
chunk, one chunk per word, a finish chunk, a usage chunk when
``stream_options.include_usage``, then ``data: [DONE]``), ``POST /v1/embeddings`` and
``POST /v1/moderations``.

Each call takes the next :class:`Script` of its endpoint's queue (``script(...,
endpoint="chat" | "embeddings" | "moderations")``); an empty queue answers
``Script.ok()`` with the stand-in's ``default_text``. Scripts:

- ``Script.ok(text=None, *, usage=AUTO | None | (prompt, completion), finish_reason,
  delay)`` — ``AUTO`` usage is deterministic: prompt = words in all messages,
  completion = words of the text, so unary and streamed usage agree. ``None`` sends
  no usage at all (not even in a stream).
- ``Script.error(status, message, *, retry_after=None, delay)`` — an OpenAI error body
  ``{"error": {"message", "type", "code"}}``; ``retry_after`` (number or HTTP date
  string) becomes the ``Retry-After`` header.
- ``Script.slow(seconds, text=None)`` — ok after sleeping.
- ``Script.malformed()`` — a broken JSON body (unary) or a broken ``data:`` line (SSE).
- ``Script.truncated()`` — a stream cut off after the first word (no finish, no
  ``[DONE]``); unary: a JSON body without ``choices``.
- ``Script.moderation(*scores)`` (moderations) — one result per ``{category: score}``
  mapping, a category flagged at a score >= 0.5 (give fewer or more mappings than
  inputs to send a wrong result count). ``Script.ok()`` there: every input unflagged
  with score 0 in ``violence``. ``error`` and ``malformed`` work as for chat.

``api_key="..."`` makes every call without ``Authorization: Bearer <key>`` a 401.
Embeddings are deterministic vectors of ``embedding_dimensions`` floats per input.
Thread-safe: scripts and records are shared between the test and the server thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

__all__ = ["AUTO", "OpenAIStandIn", "Received", "Script"]

AUTO: Any = "auto"
Endpoint = Literal["chat", "embeddings", "moderations"]
_PATHS: dict[str, str] = {
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
    "moderations": "/v1/moderations",
}


@dataclass(frozen=True)
class Script:
    kind: Literal["ok", "error", "malformed", "truncated"] = "ok"
    text: str | None = None
    usage: Any = AUTO
    finish_reason: str = "stop"
    status: int = 200
    message: str = ""
    retry_after: float | str | None = None
    delay: float = 0.0
    #: moderations: one {category: score} per result (None: every input unflagged)
    scores: tuple[dict[str, float], ...] | None = None

    @classmethod
    def ok(
        cls,
        text: str | None = None,
        *,
        usage: Any = AUTO,
        finish_reason: str = "stop",
        delay: float = 0.0,
    ) -> Script:
        return cls("ok", text=text, usage=usage, finish_reason=finish_reason, delay=delay)

    @classmethod
    def error(
        cls,
        status: int,
        message: str = "stand-in error",
        *,
        retry_after: float | str | None = None,
        delay: float = 0.0,
    ) -> Script:
        return cls("error", status=status, message=message, retry_after=retry_after, delay=delay)

    @classmethod
    def slow(cls, seconds: float, text: str | None = None) -> Script:
        return cls("ok", text=text, delay=seconds)

    @classmethod
    def moderation(cls, *scores: dict[str, float]) -> Script:
        return cls("ok", scores=tuple(scores))

    @classmethod
    def malformed(cls) -> Script:
        return cls("malformed")

    @classmethod
    def truncated(cls) -> Script:
        return cls("truncated")


@dataclass(frozen=True)
class Received:
    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    at: float = 0.0


def _words(text: str) -> int:
    return len(text.split())


class OpenAIStandIn:
    def __init__(
        self,
        *,
        default_text: str = "The stand-in answers.",
        api_key: str | None = None,
        embedding_dimensions: int = 8,
    ) -> None:
        self.default_text = default_text
        self.api_key = api_key
        self.embedding_dimensions = embedding_dimensions
        self._lock = threading.Lock()
        self._queues: dict[Endpoint, deque[Script]] = {
            "chat": deque(),
            "embeddings": deque(),
            "moderations": deque(),
        }
        self._requests: list[Received] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._closing = threading.Event()
        self.app = self._build_app()

    # -- scripting and records ---------------------------------------------------------

    def script(self, *scripts: Script, endpoint: Endpoint = "chat") -> None:
        with self._lock:
            self._queues[endpoint].extend(scripts)

    def _next(self, endpoint: Endpoint) -> Script:
        with self._lock:
            queue = self._queues[endpoint]
            return queue.popleft() if queue else Script.ok()

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def calls(self, endpoint: Endpoint = "chat") -> int:
        return sum(1 for r in self.requests if r.path == _PATHS[endpoint])

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            for queue in self._queues.values():
                queue.clear()

    # -- the app ---------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, "chat")

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            return await self._handle(request, "embeddings")

        @app.post("/v1/moderations")
        async def moderations(request: Request) -> Response:
            return await self._handle(request, "moderations")

        return app

    async def _handle(self, request: Request, endpoint: Endpoint) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        with self._lock:
            self._requests.append(
                Received(request.url.path, body, dict(request.headers), time.monotonic())
            )
        if self.api_key is not None and request.headers.get("authorization") != (
            f"Bearer {self.api_key}"
        ):
            return self._error(Script.error(401, "Incorrect API key provided"))
        script = self._next(endpoint)
        if script.delay and not await self._delay(script.delay):
            return self._error(Script.error(503, "the stand-in is shutting down"))
        if script.kind == "error":
            return self._error(script)
        if not isinstance(body, dict):
            return self._error(Script.error(400, "the body is not a JSON object"))
        if endpoint == "embeddings":
            return self._embeddings(body, script)
        if endpoint == "moderations":
            return self._moderations(body, script)
        text = self.default_text if script.text is None else script.text
        usage = self._usage(body, text, script)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._sse(body, text, usage if include else None, script),
                media_type="text/event-stream",
            )
        if script.kind == "malformed":
            return Response('{"id": "chatcmpl-x", "choices": [', media_type="application/json")
        if script.kind == "truncated":
            return JSONResponse({"id": "chatcmpl-x", "object": "chat.completion"})
        payload: dict[str, Any] = {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": script.finish_reason,
                }
            ],
        }
        if usage is not None:
            payload["usage"] = usage
        return JSONResponse(payload)

    async def _delay(self, seconds: float) -> bool:
        # in small steps, so stop() never waits for (or cancels) a slow answer
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._closing.is_set():
                return False
            await asyncio.sleep(min(left, 0.02))
        return True

    @staticmethod
    def _usage(body: dict[str, Any], text: str, script: Script) -> dict[str, int] | None:
        if script.usage is None:
            return None
        if script.usage is AUTO or script.usage == AUTO:
            messages = body.get("messages") or []
            prompt = sum(_words(str(m.get("content", ""))) for m in messages)
            completion = _words(text)
        else:
            prompt, completion = script.usage
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    @staticmethod
    def _error(script: Script) -> Response:
        headers = {}
        if script.retry_after is not None:
            headers["Retry-After"] = str(script.retry_after)
        kind = "rate_limit_error" if script.status == 429 else "invalid_request_error"
        return JSONResponse(
            {"error": {"message": script.message, "type": kind, "code": None}},
            status_code=script.status,
            headers=headers,
        )

    async def _sse(
        self, body: dict[str, Any], text: str, usage: dict[str, int] | None, script: Script
    ) -> AsyncIterator[bytes]:
        model = body.get("model", "")

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            data = {
                "id": "chatcmpl-standin",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""}, None)
        if script.kind == "malformed":
            yield b'data: {"id": "chatcmpl-standin", "choices": [\n\n'
            yield b"data: [DONE]\n\n"
            return
        words = text.split(" ")
        for i, word in enumerate(words):
            yield chunk({"content": word if i == 0 else " " + word}, None)
            if script.kind == "truncated":
                return
        yield chunk({}, script.finish_reason)
        if usage is not None:
            data = {
                "id": "chatcmpl-standin",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _embeddings(self, body: dict[str, Any], script: Script) -> Response:
        if script.kind == "malformed":
            return Response('{"data": [', media_type="application/json")
        inputs = body.get("input") or []
        if isinstance(inputs, str):
            inputs = [inputs]
        data = []
        for i, text in enumerate(inputs):
            digest = hashlib.sha256(str(text).encode()).digest()
            raw = [b / 255 - 0.5 for b in digest[: self.embedding_dimensions]]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [x / norm for x in raw]})
        payload: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model", "")}
        if script.usage is not None:
            tokens = sum(_words(str(t)) for t in inputs)
            payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse(payload)

    @staticmethod
    def _moderations(body: dict[str, Any], script: Script) -> Response:
        if script.kind == "malformed":
            return Response('{"results": [', media_type="application/json")
        inputs = body.get("input") or []
        if isinstance(inputs, str):
            inputs = [inputs]
        scores = script.scores
        if scores is None:
            scores = tuple({"violence": 0.0} for _ in inputs)
        results = [
            {
                "flagged": any(v >= 0.5 for v in s.values()),
                "categories": {k: v >= 0.5 for k, v in s.items()},
                "category_scores": dict(s),
            }
            for s in scores
        ]
        payload = {"id": "modr-standin", "model": body.get("model", ""), "results": results}
        return JSONResponse(payload)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the stand-in is not started")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIStandIn:
        self._closing.clear()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: without, a reply on a reused connection
        # waits out the client's delayed ACK (~40 ms) behind Nagle's algorithm
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=0.2,
            loop="asyncio",
            http="h11",
            ws="none",
        )
        server = uvicorn.Server(config)
        self._server = server
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="openai-standin", daemon=True
        )
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stand-in did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = None

    def __enter__(self) -> OpenAIStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> OpenAIStandIn:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

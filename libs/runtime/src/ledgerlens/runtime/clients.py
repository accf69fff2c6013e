"""Typed async clients for calling other ledgerlens services.

A client is the generated stub over a ``grpc.aio`` channel whose interceptors add,
on every call:

* ``authorization: Bearer <token>`` from a token provider (the caller's token when a
  request is being served on someone's behalf, else the service token);
* the W3C trace context (``traceparent``/``tracestate``) of the current span;
* a default deadline when the caller gave none;
* for unary-unary calls only, retries on ``UNAVAILABLE`` with full-jitter exponential
  backoff, a bounded number of attempts, and never past the call's deadline.

The stub stays the generated, typed stub::

    async with retrieval_client("retrieval:50051", token_provider=tokens) as client:
        response = await client.stub.Search(SearchRequest(query="EIP-4844"))

Retries are safe because every ledgerlens write is idempotent (idempotency keys),
but a client for a non-idempotent API can pass ``retry=None``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Unpack

import grpc
from grpc.aio import ClientCallDetails, Metadata
from opentelemetry import propagate
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

if TYPE_CHECKING:
    # the *AsyncStub aliases exist in the generated .pyi files only (mypy-protobuf)
    from ledgerlens.identity.v1.identity_pb2_grpc import IdentityServiceAsyncStub
    from ledgerlens.inference.v1.inference_pb2_grpc import InferenceServiceAsyncStub
    from ledgerlens.ingestion.v1.ingestion_pb2_grpc import IngestionServiceAsyncStub
    from ledgerlens.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub
    from ledgerlens.retrieval.v1.retrieval_pb2_grpc import RetrievalServiceAsyncStub
    from ledgerlens.runtime.settings import ServiceSettings

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "CallPreparer",
    "ConnectOptions",
    "RetryPolicy",
    "ServiceClient",
    "TokenProvider",
    "channel_options",
    "client_interceptors",
    "connect",
    "identity_client",
    "inference_client",
    "ingestion_client",
    "ledger_client",
    "retrieval_client",
    "service_token_provider",
    "static_token",
]

logger = logging.getLogger(__name__)

StubT = TypeVar("StubT")

#: Returns the bearer token for the next call (or ``None`` for no ``authorization``);
#: may be a coroutine function, e.g. one that refreshes an expiring service token.
TokenProvider = Callable[[], str | None] | Callable[[], Awaitable[str | None]]

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of unary calls that failed with ``UNAVAILABLE``.

    Attempt *n* (n >= 1) is followed by a sleep drawn uniformly from
    ``[0, min(max_backoff, initial_backoff * 2**(n-1))]`` ("full jitter"), unless that
    sleep would end past the call's deadline: then the last error is raised at once.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoffs must be >= 0")


def static_token(token: str | None) -> TokenProvider:
    """A provider that always returns ``token``."""

    def provide() -> str | None:
        return token

    return provide


def service_token_provider(settings: ServiceSettings) -> TokenProvider:
    """A provider of the calling service's own token.

    The static ``<PREFIX>SERVICE_TOKEN`` when set; else, with
    ``<PREFIX>SERVICE_CLIENT_ID``, ``..._SERVICE_CLIENT_SECRET`` and
    ``..._SERVICE_TOKEN_URL``, an async provider that fetches (and caches, and
    refreshes) a token from identity by the client-credentials grant; else no token.
    """
    if settings.service_token is None:
        given = {
            "service_client_id": settings.service_client_id,
            "service_client_secret": settings.service_client_secret,
            "service_token_url": settings.service_token_url,
        }
        missing = [name for name, value in given.items() if not value]
        if len(missing) < len(given):
            if missing:
                raise ValueError(f"service client credentials need {', '.join(missing)} too")
            from ledgerlens.runtime.service_tokens import ClientCredentialsTokens

            assert settings.service_client_id is not None
            assert settings.service_client_secret is not None
            assert settings.service_token_url is not None
            return ClientCredentialsTokens(
                settings.service_token_url,
                settings.service_client_id,
                settings.service_client_secret.get_secret_value(),
            )

    def provide() -> str | None:
        secret = settings.service_token
        return secret.get_secret_value() if secret is not None else None

    return provide


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


_CallT = TypeVar("_CallT")
_Continuation = Callable[[ClientCallDetails, Any], Awaitable[_CallT]]
_UU = grpc.aio.UnaryUnaryCall[Any, Any]
_US = grpc.aio.UnaryStreamCall[Any, Any]
_SU = grpc.aio.StreamUnaryCall[Any, Any]
_SS = grpc.aio.StreamStreamCall[Any, Any]


class CallPreparer:
    """Adds ``authorization`` and the trace context to a call, and its default deadline."""

    def __init__(
        self,
        *,
        token_provider: TokenProvider | None = None,
        default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        stream_timeout: float | None = None,
    ) -> None:
        self.token_provider = token_provider
        self.default_timeout = default_timeout
        self.stream_timeout = stream_timeout

    async def _token(self) -> str | None:
        if self.token_provider is None:
            return None
        token = self.token_provider()
        if inspect.isawaitable(token):
            return await token
        return token

    async def prepare(self, details: ClientCallDetails, *, streaming: bool) -> ClientCallDetails:
        metadata = Metadata(*(details.metadata or ()))
        # A token the caller set on the call (forwarding its own caller's) wins.
        if "authorization" not in metadata:
            token = await self._token()
            if token:
                metadata.add("authorization", f"Bearer {token}")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        for key, value in carrier.items():
            if key not in metadata:
                metadata.add(key, value)
        timeout = details.timeout
        if timeout is None:
            timeout = self.stream_timeout if streaming else self.default_timeout
        return _with(details, timeout=timeout, metadata=metadata)


# grpc.aio files each interceptor under the FIRST of the four interceptor base classes it
# derives from, so each call shape needs an interceptor object of its own.
#
# Retrying lives here, with tenacity, rather than in gRPC's service-config ``retryPolicy``
# because: we retry unary-unary calls only, by construction (the service config would
# also replay streams); tenacity gives a deadline-aware stop (``stop_before_delay``) and
# full-jitter backoff whose parameters are typed Python, not a JSON blob capped at 5
# attempts; and each attempt passes through the inner interceptors (metrics, logs).
class UnaryUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Prepares unary calls and retries them on ``UNAVAILABLE`` (see :class:`RetryPolicy`)."""

    def __init__(self, preparer: CallPreparer, retry: RetryPolicy | None) -> None:
        self._preparer = preparer
        self._retry = retry

    async def intercept_unary_unary(
        self,
        continuation: _Continuation[_UU],
        client_call_details: ClientCallDetails,
        request: Any,
    ) -> _UU:
        details = await self._preparer.prepare(client_call_details, streaming=False)
        if self._retry is None:
            return await continuation(details, request)
        # Without a deadline the retries are bounded by attempts alone.
        budget = details.timeout
        deadline = None if budget is None else time.monotonic() + budget
        stop: stop_base = stop_after_attempt(self._retry.max_attempts)
        if budget is not None:
            stop = stop | stop_before_delay(budget)
        retrying = AsyncRetrying(
            stop=stop,
            wait=wait_random_exponential(
                multiplier=self._retry.initial_backoff, max=self._retry.max_backoff
            ),
            retry=retry_if_exception(_is_unavailable),
            before_sleep=before_sleep_log(logger, logging.DEBUG),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                call = await continuation(_with(details, timeout=timeout), request)
                # Awaiting the call raises its AioRpcError; on success the finished call is
                # returned so the caller still reads its code and trailing metadata.
                await call
                return call
        raise AssertionError("unreachable: tenacity either returns or reraises")


# grpc-stubs declare a synchronous continuation; grpc.aio's is a coroutine: hence the
# override ignores below.
class UnaryStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Prepares server-streaming calls (never retried: part of a stream may be consumed)."""

    def __init__(self, preparer: CallPreparer) -> None:
        self._preparer = preparer

    async def intercept_unary_stream(  # type: ignore[override]
        self,
        continuation: _Continuation[_US],
        client_call_details: ClientCallDetails,
        request: Any,
    ) -> _US:
        details = await self._preparer.prepare(client_call_details, streaming=True)
        return await continuation(details, request)


class StreamUnaryInterceptor(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    """Prepares client-streaming calls (never retried: the request stream is consumed)."""

    def __init__(self, preparer: CallPreparer) -> None:
        self._preparer = preparer

    async def intercept_stream_unary(  # type: ignore[override]
        self,
        continuation: _Continuation[_SU],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> _SU:
        details = await self._preparer.prepare(client_call_details, streaming=True)
        return await continuation(details, request_iterator)


class StreamStreamInterceptor(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """Prepares bidirectional-streaming calls (never retried)."""

    def __init__(self, preparer: CallPreparer) -> None:
        self._preparer = preparer

    async def intercept_stream_stream(  # type: ignore[override]
        self,
        continuation: _Continuation[_SS],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> _SS:
        details = await self._preparer.prepare(client_call_details, streaming=True)
        return await continuation(details, request_iterator)


def client_interceptors(
    *,
    token_provider: TokenProvider | None = None,
    default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
    stream_timeout: float | None = None,
    retry: RetryPolicy | None = None,
) -> list[Any]:
    """The interceptors of a ledgerlens client channel, one per call shape."""
    preparer = CallPreparer(
        token_provider=token_provider,
        default_timeout=default_timeout,
        stream_timeout=stream_timeout,
    )
    return [
        UnaryUnaryInterceptor(preparer, retry),
        UnaryStreamInterceptor(preparer),
        StreamUnaryInterceptor(preparer),
        StreamStreamInterceptor(preparer),
    ]


_UNSET: Any = object()


def _with(
    details: ClientCallDetails, *, timeout: float | None = _UNSET, metadata: Metadata = _UNSET
) -> ClientCallDetails:
    return ClientCallDetails(
        details.method,
        details.timeout if timeout is _UNSET else timeout,
        details.metadata if metadata is _UNSET else metadata,
        details.credentials,
        details.wait_for_ready,
    )


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_seconds: float = 30.0,
    keepalive_timeout_seconds: float = 10.0,
    max_reconnect_backoff_seconds: float = 2.0,
) -> list[tuple[str, int]]:
    """gRPC channel arguments shared by every client."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_seconds * 1000)),
        # A peer that restarts should be re-dialled within a retry's backoff, not after
        # gRPC's default reconnect backoff (1 s growing to 120 s): until it re-dials,
        # every attempt fails fast with UNAVAILABLE and the retries would be spent.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff_seconds * 1000)),
    ]


class ServiceClient(Generic[StubT]):
    """A generated stub over its own channel. Close it (or use ``async with``)."""

    def __init__(self, target: str, channel: grpc.aio.Channel, stub: StubT) -> None:
        self.target = target
        self.channel = channel
        self.stub = stub

    async def wait_ready(self, within_seconds: float) -> None:
        """Wait until the channel is connected (raises ``TimeoutError``)."""
        await asyncio.wait_for(self.channel.channel_ready(), within_seconds)

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)

    async def __aenter__(self) -> ServiceClient[StubT]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def connect(
    stub_class: Callable[[grpc.aio.Channel], StubT],
    target: str,
    *,
    token_provider: TokenProvider | None = None,
    default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
    stream_timeout: float | None = None,
    retry: RetryPolicy | None = RetryPolicy(),
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_seconds: float = 30.0,
    keepalive_timeout_seconds: float = 10.0,
    extra_options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> ServiceClient[StubT]:
    """A client of the service at ``target`` (``host:port``) through ``stub_class``.

    Call it inside the running event loop. ``default_timeout`` is the deadline of a unary
    call that sets none; ``stream_timeout`` the one of a streaming call (``None``: no
    deadline, e.g. for long event streams). ``credentials`` switches the channel to TLS.
    ``interceptors`` run inside ours (they see the auth/trace metadata and each retry).
    """
    options: list[tuple[str, Any]] = [
        *channel_options(
            max_message_bytes=max_message_bytes,
            keepalive_time_seconds=keepalive_time_seconds,
            keepalive_timeout_seconds=keepalive_timeout_seconds,
        ),
        *extra_options,
    ]
    chain = [
        *client_interceptors(
            token_provider=token_provider,
            default_timeout=default_timeout,
            stream_timeout=stream_timeout,
            retry=retry,
        ),
        *interceptors,
    ]
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=options, interceptors=chain)
    return ServiceClient(target, channel, stub_class(channel))


# --------------------------------------------------------------------------- per service


class ConnectOptions(TypedDict, total=False):
    """The keyword options of :func:`connect`, for the named constructors."""

    token_provider: TokenProvider | None
    default_timeout: float | None
    stream_timeout: float | None
    retry: RetryPolicy | None
    credentials: grpc.ChannelCredentials | None
    max_message_bytes: int
    keepalive_time_seconds: float
    keepalive_timeout_seconds: float
    extra_options: Sequence[tuple[str, Any]]
    interceptors: Sequence[Any]


# Thin named constructors: ``connect`` with the service's generated stub. The contract
# modules are imported on first use, so importing this module stays cheap.


def identity_client(
    target: str, **options: Unpack[ConnectOptions]
) -> ServiceClient[IdentityServiceAsyncStub]:
    """A client of identity (``ledgerlens.identity.v1.IdentityService``)."""
    from ledgerlens.identity.v1 import identity_pb2_grpc

    return connect(identity_pb2_grpc.IdentityServiceStub, target, **options)


def ingestion_client(
    target: str, **options: Unpack[ConnectOptions]
) -> ServiceClient[IngestionServiceAsyncStub]:
    """A client of ingestion (``ledgerlens.ingestion.v1.IngestionService``)."""
    from ledgerlens.ingestion.v1 import ingestion_pb2_grpc

    return connect(ingestion_pb2_grpc.IngestionServiceStub, target, **options)


def retrieval_client(
    target: str, **options: Unpack[ConnectOptions]
) -> ServiceClient[RetrievalServiceAsyncStub]:
    """A client of retrieval (``ledgerlens.retrieval.v1.RetrievalService``)."""
    from ledgerlens.retrieval.v1 import retrieval_pb2_grpc

    return connect(retrieval_pb2_grpc.RetrievalServiceStub, target, **options)


def inference_client(
    target: str, **options: Unpack[ConnectOptions]
) -> ServiceClient[InferenceServiceAsyncStub]:
    """A client of inference (``ledgerlens.inference.v1.InferenceService``)."""
    from ledgerlens.inference.v1 import inference_pb2_grpc

    return connect(inference_pb2_grpc.InferenceServiceStub, target, **options)


def ledger_client(
    target: str, **options: Unpack[ConnectOptions]
) -> ServiceClient[LedgerServiceAsyncStub]:
    """A client of ledger (``ledgerlens.ledger.v1.LedgerService``)."""
    from ledgerlens.ledger.v1 import ledger_pb2_grpc

    return connect(ledger_pb2_grpc.LedgerServiceStub, target, **options)

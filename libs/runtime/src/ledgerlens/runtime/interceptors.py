"""The one server interceptor of every ledgerlens gRPC server.

Per call it: continues the caller's W3C trace in a server span; binds the RPC name for
logs (trace and span ids come from the span); authenticates the bearer JWT and checks
the scopes the RPC's contract declares (``ledgerlens.options.v1.auth``); exposes the
caller as :func:`~ledgerlens.runtime.auth.current_principal`; maps
:class:`~ledgerlens.runtime.errors.DomainError` to a status with ``google.rpc``
details and anything unexpected to a generic ``INTERNAL``; observes
``ledgerlens_rpc_server_duration_seconds``; and, once shutdown began, refuses new calls
with ``UNAVAILABLE`` while the in-flight ones drain.

Why one composite wrapper instead of four interceptors, applied at registration: each
method's handler is wrapped once, with everything it needs resolved up front (labels,
policy, span name). :func:`~ledgerlens.runtime.server.build_server` wraps the handlers
as the generated ``add_*_to_server`` functions register them, so no grpc.aio
interceptor runs at all: grpc.aio awaits every interceptor's ``intercept_service`` as
an extra coroutine on every call, which cost a third of the runtime's overhead in
``bench/runtime_overhead.py``. The class still works as a plain ``ServerInterceptor``
for servers built elsewhere.

Health (``grpc.health.v1.Health``) is exempt from auth, tracing and shutdown refusal
(a probe must see ``NOT_SERVING`` while draining); reflection is exempt from auth.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ledgerlens.options.v1 import auth_pb2
from ledgerlens.runtime.auth import Principal, TokenVerifier
from ledgerlens.runtime.calls import CallInfo, call_var
from ledgerlens.runtime.errors import (
    DomainError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    internal_status,
    to_grpc_status,
)
from ledgerlens.runtime.metrics import RpcMetrics, rpc_metrics
from ledgerlens.runtime.telemetry import extract_trace_context, tracing_exported

__all__ = [
    "HEALTH_PREFIX",
    "AuthPolicyError",
    "MethodPolicy",
    "RuntimeInterceptor",
    "policies_from_descriptors",
]

_log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_OK = grpc.StatusCode.OK
_DRAIN_POLL_SECONDS = 0.005
_CANCELLED = grpc.StatusCode.CANCELLED
_INTERNAL = grpc.StatusCode.INTERNAL


class AuthPolicyError(ValueError):
    """A served RPC has no (or an inconsistent) ``ledgerlens.options.v1.auth`` policy."""


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """Who may call one RPC: anyone (``public``) or a token with all ``scopes``."""

    scopes: tuple[str, ...] = ()
    public: bool = False


def policies_from_descriptors(
    services: Iterable[ServiceDescriptor],
) -> dict[str, MethodPolicy]:
    """``{"/pkg.Service/Method": policy}`` read from the contracts' method options.

    Raises :class:`AuthPolicyError` for an RPC without a policy, or with one that is
    neither public nor lists a scope, or both (fail closed: the server does not start).
    """
    extension = auth_pb2.auth
    policies: dict[str, MethodPolicy] = {}
    problems: list[str] = []
    for service in services:
        for method in service.methods:
            full = f"/{service.full_name}/{method.name}"
            options = method.GetOptions()
            if not options.HasExtension(extension):
                problems.append(f"{full}: no (ledgerlens.options.v1.auth) option")
                continue
            policy = options.Extensions[extension]
            scopes = tuple(policy.scopes)
            if policy.public == bool(scopes):
                problems.append(f"{full}: auth policy must be public or list scopes, not both")
                continue
            policies[full] = MethodPolicy(scopes=scopes, public=policy.public)
    if problems:
        raise AuthPolicyError(
            "refusing to serve RPCs without a valid auth policy: " + "; ".join(problems)
        )
    return policies


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _Method:
    """Everything one RPC's wrapper needs, resolved once."""

    __slots__ = (
        "auth",
        "by_code",
        "deny",
        "drains",
        "full",
        "histogram",
        "labels",
        "ok",
        "scope_set",
        "span_attributes",
        "traced",
    )

    def __init__(
        self, full: str, policy: MethodPolicy | None, exempt: bool, metrics: RpcMetrics
    ) -> None:
        self.full = full
        service, _, name = full.lstrip("/").partition("/")
        self.labels = (service, name)
        self.histogram = metrics.duration
        #: histogram children by status code, created on first use (``labels()`` is slow)
        self.by_code: dict[grpc.StatusCode, Any] = {}
        self.ok = metrics.duration.series(service, name, "OK")
        health = full.startswith(HEALTH_PREFIX)
        self.traced = not health
        self.drains = not health
        # None: no auth check; a policy: check it; deny: served but undeclared (fail closed)
        self.deny = policy is None and not exempt
        self.auth = None if policy is None or policy.public else policy
        self.scope_set = frozenset(policy.scopes) if policy is not None else frozenset()
        self.span_attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
        }

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        if code is _OK:  # the common case, without hashing an enum member
            self.ok.observe(seconds)
            return
        child = self.by_code.get(code)
        if child is None:
            child = self.by_code[code] = self.histogram.series(*self.labels, code.name)
        child.observe(seconds)


class RuntimeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Auth, tracing, log context, RED metrics, error mapping and drain, in one wrapper.

    ``policies`` maps full method names to their :class:`MethodPolicy` (see
    :func:`policies_from_descriptors`); ``verifier`` ``None`` disables token checks
    (tests and tools only; scopes are then not enforced either).
    """

    def __init__(
        self,
        *,
        policies: Mapping[str, MethodPolicy],
        verifier: TokenVerifier | None,
        metrics: RpcMetrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._policies = dict(policies)
        self._verifier = verifier
        self._metrics = metrics or rpc_metrics()
        self._tracer = tracer or trace.get_tracer("ledgerlens.runtime")
        self._wrapped: dict[str, Handler] = {}
        self._methods: dict[str, _Method] = {}
        self._draining = False
        # A plain counter, polled by wait_idle(): an asyncio.Event set and cleared as
        # calls come and go cost more per call than the rest of the drain logic together.
        self._inflight = 0

    # -- hooks -------------------------------------------------------------------------

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` of ``method`` (``/pkg.Service/Method``) wrapped by this runtime.

        Called once per method at registration (see :mod:`ledgerlens.runtime.server`).
        """
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def lookup(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        """The wrapped handler of a call, with the call's state bound for the wrapper.

        The server's generic handler (see :mod:`ledgerlens.runtime.server`) calls this
        in the call's own task, handing over the metadata grpc.aio built for the lookup.
        """
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            call_var.set(_Call(self._methods[method], handler_call_details.invocation_metadata))
        return wrapped

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        """The same wrapping as a plain grpc.aio interceptor, for servers not built here."""
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
                return handler
            wrapped = self.wrap(method, handler)
        call_var.set(_Call(self._methods[method], handler_call_details.invocation_metadata))
        return wrapped

    # -- shutdown ------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Calls being served now (health excluded)."""
        return self._inflight

    def begin_shutdown(self) -> None:
        """Refuse new calls (except health) with UNAVAILABLE from now on."""
        self._draining = True

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until no call is in flight; ``False`` if ``seconds`` passed first."""
        deadline = time.monotonic() + seconds
        while self._inflight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
        return True

    # -- wrapping ------------------------------------------------------------------------

    def _wrap(self, full: str, handler: Handler) -> Handler:
        exempt = full.startswith(HEALTH_PREFIX) or full.startswith(REFLECTION_PREFIXES)
        m = self._methods[full] = _Method(full, self._policies.get(full), exempt, self._metrics)
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._coroutine(m, handler.unary_unary), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._coroutine(m, handler.stream_unary), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(m, handler.unary_stream), **kwargs
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(m, handler.stream_stream), **kwargs
            )
        raise TypeError(f"handler of {full} has no behaviour")  # pragma: no cover

    def _coroutine(self, m: _Method, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = self._call(m)
            try:
                token = self._begin(call, context)
                if token is not None:
                    await self._authenticate(call, token)
                return await behavior(request, context)
            except BaseException as exc:
                await self._fail(call, exc, context)
                raise  # only reached for cancellation / abort
            finally:
                self._end(call, context)

        return run

    def _streaming(self, m: _Method, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write()
            return self._coroutine(m, behavior)

        async def run(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call = self._call(m)
            try:
                token = self._begin(call, context)
                if token is not None:
                    await self._authenticate(call, token)
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                await self._fail(call, exc, context)
                raise
            finally:
                self._end(call, context)

        return run

    # -- per call ------------------------------------------------------------------------

    @staticmethod
    def _call(m: _Method) -> _Call:
        """The call's state bound at lookup, or a new one (a handler run another way)."""
        call = call_var.get()
        if type(call) is _Call and call.m is m and not call.started:
            call.started = True
            return call
        call = _Call(m, None)
        call.started = True
        call.var_token = call_var.set(call)
        return call

    def _begin(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """Open the call's span and contexts, then admit it (or raise a DomainError).

        Synchronous, because every extra coroutine layer costs measurably per call
        (``bench/runtime_overhead.py``): a token seen before is admitted here; a new one
        is returned for :meth:`_authenticate` to verify (which may fetch the JWKS).
        """
        m = call.m
        if m.drains:
            self._inflight += 1
        metadata = call.metadata
        if metadata is None:  # not bound at lookup: ask the context (slower)
            metadata = call.metadata = tuple(context.invocation_metadata() or ())
        # one pass over the metadata for what this wrapper needs
        authorization: str | None = None
        has_trace = False
        for key, value in metadata:
            if key == "authorization":
                authorization = value
            elif key == "traceparent":
                has_trace = True
        if m.traced:
            parent = extract_trace_context(metadata) if has_trace else None
            if tracing_exported():
                call.span = span = self._tracer.start_span(
                    m.full, context=parent, kind=SpanKind.SERVER, attributes=m.span_attributes
                )
                call.otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
            elif parent is not None:
                # Tracing off (the default): no span, which would be dropped anyway, but
                # the caller's trace still flows on to logs, outgoing calls and events.
                call.otel_token = otel_context.attach(parent)
        if self._draining and m.drains:
            raise Unavailable("server is shutting down", retry_after=1.0)
        if m.deny:
            raise PermissionDenied(f"{m.full} declares no auth policy", reason="NO_AUTH_POLICY")
        if m.auth is not None and (verifier := self._verifier) is not None:
            principal = None
            if authorization is not None and authorization[:7] == "Bearer ":
                # the usual form: a token seen before is admitted without parsing more
                principal = verifier.remembered(authorization[7:])
            if principal is None:
                return _bearer(authorization)
            if not m.scope_set <= principal.scopes:
                self._admit(call, m.auth, principal)  # raises, naming the missing scope
            call.principal = principal
        return None

    async def _authenticate(self, call: _Call, token: str) -> None:
        """Verify a token not seen before, then admit the call."""
        assert self._verifier is not None
        assert call.m.auth is not None
        self._admit(call, call.m.auth, await self._verifier.verify(token))

    @staticmethod
    def _admit(call: _Call, policy: MethodPolicy, principal: Principal) -> None:
        for scope in policy.scopes:
            if scope not in principal.scopes:
                raise PermissionDenied(
                    f"missing scope {scope!r}",
                    reason="SCOPE_MISSING",
                    metadata={"scope": scope},
                )
        call.principal = principal

    async def _fail(
        self, call: _Call, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        # abort() sends the status at once, so the call is recorded first: whoever sees
        # the status (a client, then a scrape) also sees it counted.
        if isinstance(exc, DomainError):
            call.code = exc.code
            self._record(call, context)
            status = to_grpc_status(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)
        if isinstance(exc, grpc.aio.AbortError):  # the servicer called context.abort()
            call.code = _code_of(context) or grpc.StatusCode.UNKNOWN
            return
        if isinstance(exc, asyncio.CancelledError):
            call.code = _CANCELLED
            return
        if not isinstance(exc, Exception):  # GeneratorExit, KeyboardInterrupt, ...
            return
        # The one place an unexpected exception is caught: it is logged with its
        # traceback and reported as a generic INTERNAL, so no internals leak.
        call.code = _INTERNAL
        _log.error("unhandled exception in %s", call.m.full, exc_info=exc)
        self._record(call, context)
        status = internal_status()
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _record(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Observe the duration, end the span and leave the in-flight count (once)."""
        call.recorded = True
        code = call.code
        if code is None:  # a servicer may have set one and returned without raising
            code = _code_of(context) or _OK
        call.m.observe(code, time.perf_counter() - call.start)
        span = call.span
        if span is not None:
            if code is not _OK:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_FAULTS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
        if call.m.drains:
            self._inflight -= 1

    def _end(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not call.recorded:
            self._record(call, context)
        if call.var_token is not None:
            call_var.reset(call.var_token)
        if call.otel_token is not None:
            otel_context.detach(call.otel_token)


# OpenTelemetry's gRPC conventions: a server span is an error only for server faults.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _Call(CallInfo):
    """Per-call state (slots: cheaper than a dict or a dataclass)."""

    __slots__ = (
        "code",
        "m",
        "otel_token",
        "recorded",
        "span",
        "start",
        "started",
        "var_token",
    )

    def __init__(self, method: _Method, metadata: Sequence[tuple[str, Any]] | None) -> None:
        # CallInfo's fields set here rather than through super().__init__(): one call
        # less on every RPC's path
        self.method = method.full
        self.metadata = metadata
        self.principal = None
        self.m = method
        self.start = time.perf_counter()
        self.started = False
        self.code: grpc.StatusCode | None = None
        self.recorded = False
        self.span: trace.Span | None = None
        self.otel_token: Any = None
        #: set when this wrapper (not the lookup) bound the call: reset at the end
        self.var_token: Any = None


def _bearer(authorization: str | None) -> str:
    if authorization is not None and authorization.startswith("Bearer "):  # the usual form
        token = authorization[7:]
        if token and token[0] != " " and token[-1] != " ":
            return token
    if authorization is None:
        raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(
            "authorization metadata must be 'Bearer <token>'", reason="TOKEN_MALFORMED"
        )
    return token


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return _CODES.get(code)


_CODES: dict[Any, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

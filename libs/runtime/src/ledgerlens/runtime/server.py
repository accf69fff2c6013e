"""The gRPC server every ledgerlens service runs.

:func:`build_server` gives a grpc.aio server with the standard health service
(``grpc.health.v1``, overall and per service), reflection, message-size limits and
keepalive from the settings, and the :class:`~ledgerlens.runtime.interceptors.RuntimeInterceptor`
(auth from the contracts' policies, tracing, logs, RED metrics, error mapping). It
refuses to build when a served RPC declares no auth policy.

Shutdown (``stop()``, or SIGTERM/SIGINT after ``install_signal_handlers()``): health
turns ``NOT_SERVING``; new calls are refused with ``UNAVAILABLE`` (health keeps
answering, so probes see the change); in-flight calls get ``shutdown_grace_seconds``
to finish; whatever is left is cancelled and the server closes.

A service's ``__main__.py``::

    import asyncio

    from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
    from ledgerlens.runtime.auth import TokenVerifier
    from ledgerlens.runtime.server import build_server
    from ledgerlens.runtime.telemetry import configure_logging, configure_tracing
    from ledgerlens.services.identity.api import IdentityApi
    from ledgerlens.services.identity.settings import Settings


    async def main() -> None:
        settings = Settings()
        configure_logging(settings)
        configure_tracing(settings)
        server = build_server(
            settings,
            [(identity_pb2_grpc.add_IdentityServiceServicer_to_server, IdentityApi(settings),
              identity_pb2.DESCRIPTOR.services_by_name["IdentityService"])],
            TokenVerifier.from_settings(settings.auth),
        )
        await server.start()
        server.install_signal_handlers()
        await server.wait_for_termination()


    if __name__ == "__main__":
        asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc
import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from opentelemetry import trace

from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.interceptors import RuntimeInterceptor, policies_from_descriptors
from ledgerlens.runtime.metrics import RpcMetrics
from ledgerlens.runtime.settings import ServiceSettings

__all__ = ["ServiceRegistration", "ServiceServer", "build_server", "server_options"]

_log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING


class ServiceRegistration(NamedTuple):
    """One gRPC service to serve: the generated ``add_*_to_server``, the servicer, and
    the service's descriptor (where its RPCs' auth policies are read from)."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object
    descriptor: ServiceDescriptor


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments: message size limits and keepalive from ``settings``."""
    keepalive_ms = int(settings.keepalive_time_seconds * 1000)
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # let clients ping as often as we do, without being sent GOAWAY ENHANCE_YOUR_CALM
        ("grpc.http2.min_ping_interval_without_data_ms", min(keepalive_ms, 10_000)),
        ("grpc.http2.max_pings_without_data", 0),
        # a second process on the same port must fail to bind, not share the traffic
        ("grpc.so_reuseport", 0),
    ]


_Wrap = Callable[[str, "grpc.RpcMethodHandler[Any, Any]"], "grpc.RpcMethodHandler[Any, Any]"]


class _WrappingRegistrar:
    """Stands in for the grpc.aio server while generated ``add_*_to_server`` functions
    register their handlers, so every handler is wrapped by the runtime once, up front,
    instead of by a grpc.aio interceptor on every call (see ``interceptors``).

    grpc.aio (1.71) ignores ``add_registered_method_handlers`` and finds every call's
    handler through the generic handlers. So the services that register their handlers
    are served by one generic handler, :meth:`RuntimeInterceptor.lookup`, which also
    hands the call's metadata (built by grpc.aio for the lookup) to the wrapper.
    :meth:`finish` hands the result to the server.
    """

    def __init__(self, server: grpc.aio.Server, interceptor: RuntimeInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor
        self._generic: list[grpc.GenericRpcHandler[Any, Any]] = []
        self._registered: set[str] = set()

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrap = self._interceptor.wrap
        wrapped = {name: wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._registered.add(service)
        # grpc-stubs predates add_registered_method_handlers (grpcio >= 1.63)
        self._server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._generic.extend(handlers)

    def finish(self) -> None:
        """Register the runtime's lookup first, then generic handlers of other services."""
        handlers: list[grpc.GenericRpcHandler[Any, Any]] = [_RuntimeLookup(self._interceptor)]
        for handler in self._generic:
            name = handler.service_name() if isinstance(handler, grpc.ServiceRpcHandler) else None
            if name not in self._registered:
                handlers.append(_WrappedGenericHandler(handler, self._interceptor.wrap))
        self._server.add_generic_rpc_handlers(tuple(handlers))
        self._generic.clear()


class _RuntimeLookup(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The runtime's handler lookup as a generic handler, without a layer of its own."""

    def __init__(self, interceptor: RuntimeInterceptor) -> None:
        # grpc.aio calls .service() per call: the bound method itself, not a delegate
        self.service = interceptor.lookup  # type: ignore[method-assign]

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:  # pragma: no cover (shadowed in __init__)
        raise NotImplementedError


class _WrappedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler (the fallback lookup) whose handlers are wrapped too, once."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any], wrap: _Wrap) -> None:
        self._inner = inner
        self._wrap = wrap

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler_call_details.method, handler)


class ServiceServer:
    """A built, not yet started, server. See the module docstring for its lifecycle."""

    def __init__(
        self,
        settings: ServiceSettings,
        services: Sequence[ServiceRegistration | tuple[Any, object, ServiceDescriptor]],
        verifier: TokenVerifier | None,
        *,
        metrics: RpcMetrics | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        registrations = [ServiceRegistration(*s) for s in services]
        descriptors = [r.descriptor for r in registrations]
        if verifier is None and settings.auth.enabled:
            raise ValueError("auth is enabled but no TokenVerifier was given")
        self.settings = settings
        self.interceptor = RuntimeInterceptor(
            policies=policies_from_descriptors(descriptors),  # fails closed
            verifier=verifier if settings.auth.enabled else None,
            metrics=metrics,
            tracer=tracer,
        )
        self.server = grpc.aio.server(options=server_options(settings))
        registrar = _WrappingRegistrar(self.server, self.interceptor)
        target: Any = registrar  # stands in for the server in generated add_* functions
        for registration in registrations:
            registration.add_to_server(registration.servicer, target)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, target)
        self.service_names = [d.full_name for d in descriptors]
        # enable_server_reflection() picks its asyncio servicer only for a real grpc.aio
        # server, so the asyncio one is registered through the registrar directly
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer([*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]),
            target,
        )
        registrar.finish()
        self.bound_port: int = self.server.add_insecure_port(
            f"{settings.host}:{settings.grpc_port}"
        )
        if self.bound_port == 0:
            raise OSError(f"cannot bind {settings.host}:{settings.grpc_port}")
        self._verifier = verifier
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """``host:port`` to dial."""
        return f"{self.settings.host}:{self.bound_port}"

    async def start(self) -> None:
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, _SERVING)
        _log.info(
            "gRPC server listening on %s", self.address, extra={"services": self.service_names}
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a graceful :meth:`stop` (call from the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        _log.info("received %s, shutting down", sig.name)
        self._begin_stop(None)

    def _begin_stop(self, grace: float | None) -> asyncio.Task[None]:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(grace))
        return self._stopping

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; ``grace`` defaults to ``settings.shutdown_grace_seconds``.

        Idempotent: a second call waits for the first shutdown to finish.
        """
        await self._begin_stop(grace)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        # NOT_SERVING for "" and every service; later set() calls are ignored
        await self.health.enter_graceful_shutdown()
        self.interceptor.begin_shutdown()
        if not await self.interceptor.wait_idle(grace):
            _log.warning(
                "shutdown grace of %.1fs over, cancelling %d in-flight calls",
                grace,
                self.interceptor.inflight,
            )
        # Only health calls (e.g. Watch streams) and stragglers are left: cancel them.
        await self.server.stop(0)
        if self._verifier is not None:
            await self._verifier.aclose()
        self._stopped.set()
        _log.info("gRPC server stopped")

    async def wait_for_termination(self) -> None:
        """Return once :meth:`stop` (or a signal) has fully stopped the server."""
        await self._stopped.wait()


def build_server(
    settings: ServiceSettings,
    services: Sequence[ServiceRegistration | tuple[Any, object, ServiceDescriptor]],
    verifier: TokenVerifier | None,
    *,
    metrics: RpcMetrics | None = None,
    tracer: trace.Tracer | None = None,
) -> ServiceServer:
    """A server for ``services``, bound to ``settings.host:grpc_port`` (0: a free port).

    ``verifier`` may be ``None`` only when ``settings.auth.enabled`` is false. Raises
    :class:`~ledgerlens.runtime.interceptors.AuthPolicyError` when an RPC of
    ``services`` declares no auth policy.
    """
    return ServiceServer(settings, services, verifier, metrics=metrics, tracer=tracer)

"""The ops HTTP app every service runs beside its gRPC server.

``/healthz`` says the process serves (liveness), ``/readyz`` runs the service's
dependency checks (readiness), ``/metrics`` exposes Prometheus metrics, and the
service's REST facade routers are mounted next to them with OpenAPI docs on::

    app = build_ops_app("ingestion", {"database": store.ping, "nats": bus.ping},
                        extra_routers=[rest.router])
    ops = await serve_ops_app(app, settings.host, settings.http_port)
    ...
    mark_draining(app)      # on SIGTERM: /readyz turns 503 before the drain starts
    await ops.stop()

uvicorn runs inside the service's own asyncio loop and never installs signal
handlers: the gRPC server (``ledgerlens.runtime.server``) owns SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = [
    "OpsServer",
    "OpsState",
    "ReadinessCheck",
    "build_ops_app",
    "is_draining",
    "mark_draining",
    "serve_ops_app",
]

#: A dependency check: returns ``True``/``None`` when the dependency is usable,
#: ``False`` (or raises) when it is not. It must be cheap: it runs on every probe.
ReadinessCheck = Callable[[], Awaitable[bool | None]]

DEFAULT_CHECK_TIMEOUT_SECONDS = 2.0


@dataclass
class OpsState:
    """Mutable state of one ops app, kept on ``app.state.ops``."""

    service_name: str
    checks: dict[str, ReadinessCheck]
    check_timeout: float
    registry: CollectorRegistry
    draining: bool = False
    started_at: float = field(default_factory=time.time)


def _state(app: FastAPI) -> OpsState:
    state: OpsState = app.state.ops
    return state


def mark_draining(app: FastAPI) -> None:
    """From now on ``/readyz`` answers 503 ``draining`` (called when shutdown begins)."""
    _state(app).draining = True


def is_draining(app: FastAPI) -> bool:
    return _state(app).draining


async def _run_check(check: ReadinessCheck, limit_seconds: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit_seconds):
            result = await check()
    except TimeoutError:
        outcome: dict[str, Any] = {"ok": False, "error": f"timed out after {limit_seconds:g}s"}
    except Exception as exc:  # noqa: BLE001 - a failing check is reported, never raised
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    else:
        if result is False:
            outcome = {"ok": False, "error": "check returned False"}
        else:
            outcome = {"ok": True}
    outcome["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return outcome


def _ops_router() -> APIRouter:
    router = APIRouter(tags=["ops"])

    @router.get("/healthz", summary="Liveness: the process serves")
    async def healthz(request: Request) -> dict[str, str]:
        return {"status": "ok", "service": _state(request.app).service_name}

    @router.get(
        "/readyz",
        summary="Readiness: every dependency check passes",
        responses={503: {"description": "a dependency check failed, or the service drains"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        state = _state(request.app)
        if state.draining:
            return JSONResponse(
                {"status": "draining", "service": state.service_name, "checks": {}},
                status_code=503,
            )
        names = list(state.checks)
        # Concurrently, each under its own timeout, so one slow dependency neither
        # hides the others nor makes the probe outlast the kubelet's timeout.
        outcomes = await asyncio.gather(
            *(_run_check(state.checks[name], state.check_timeout) for name in names)
        )
        checks = dict(zip(names, outcomes, strict=True))
        ready = all(outcome["ok"] for outcome in outcomes)
        body: dict[str, Any] = {
            "status": "ready" if ready else "not ready",
            "service": state.service_name,
            "checks": checks,
        }
        if not ready:
            body["failed"] = [name for name, outcome in checks.items() if not outcome["ok"]]
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # prometheus_client picks the text format or OpenMetrics from the Accept header.
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        payload = encoder(_state(request.app).registry)
        return Response(content=payload, media_type=content_type)

    return router


def build_ops_app(
    service_name: str,
    readiness_checks: Mapping[str, ReadinessCheck] | None = None,
    *,
    registry: CollectorRegistry = REGISTRY,
    extra_routers: Sequence[APIRouter] = (),
    check_timeout: float = DEFAULT_CHECK_TIMEOUT_SECONDS,
    version: str = "0.1.0",
) -> FastAPI:
    """The service's ops + REST app.

    ``readiness_checks`` maps a dependency name (``"database"``, ``"nats"``) to its check;
    ``registry`` is the Prometheus registry ``/metrics`` exposes; ``extra_routers`` is the
    service's REST facade, documented at ``/docs`` and ``/openapi.json``.
    """
    app = FastAPI(
        title=f"ledgerlens {service_name}",
        version=version,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.ops = OpsState(
        service_name=service_name,
        checks=dict(readiness_checks or {}),
        check_timeout=check_timeout,
        registry=registry,
    )
    app.include_router(_ops_router())
    for router in extra_routers:
        app.include_router(router)
    return app


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace SIGTERM/SIGINT handlers; the gRPC server owns them.
        yield


class OpsServer:
    """A running ops app (see :func:`serve_ops_app`)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @property
    def running(self) -> bool:
        return not self._task.done()

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop accepting, let open requests finish for up to ``grace_seconds``, then close."""
        if self._task.done():
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_seconds)
        except TimeoutError:
            self._server.force_exit = True
            await self._task


def _bound_port(server: uvicorn.Server) -> int:
    for listener in server.servers:
        for sock in listener.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                port: int = sock.getsockname()[1]
                return port
    raise RuntimeError("the ops server has no TCP socket")


async def _serve(server: uvicorn.Server, host: str, port: int) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn exits the process when it cannot bind; in a task, SystemExit would
        # escape the event loop, so turn it into an ordinary error.
        raise OSError(f"ops server could not bind {host}:{port}") from exc


async def serve_ops_app(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    startup_timeout: float = 10.0,
) -> OpsServer:
    """Start ``app`` on ``host:port`` in the current loop; returns once it listens.

    ``port=0`` binds a free port; read it from :attr:`OpsServer.port`.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # keep the service's own (JSON) logging configuration
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(_serve(server, host, port), name=f"ops-http:{host}:{port}")
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if task.done():
            task.result()  # raises the OSError of _serve
            raise OSError(f"ops server stopped during start on {host}:{port}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"ops server did not start within {startup_timeout}s")
        await asyncio.sleep(0.01)
    return OpsServer(server, task, _bound_port(server))

"""The ops app over a real socket: liveness, readiness, metrics, REST facade, stop."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import httpx
import pytest
from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE

from ledgerlens.runtime.ops import (
    OpsServer,
    ReadinessCheck,
    build_ops_app,
    mark_draining,
    serve_ops_app,
)

pytestmark = pytest.mark.integration

Serve = Callable[..., Awaitable[tuple[httpx.AsyncClient, OpsServer]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Builds an ops app, serves it on a free port, returns an HTTP client for it."""
    started: list[tuple[httpx.AsyncClient, OpsServer]] = []

    async def _serve(
        checks: Mapping[str, ReadinessCheck] | None = None, **kwargs: object
    ) -> tuple[httpx.AsyncClient, OpsServer]:
        app = build_ops_app("testsvc", checks, **kwargs)  # type: ignore[arg-type]
        server = await serve_ops_app(app, "127.0.0.1", 0)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10)
        client.app = app  # type: ignore[attr-defined]
        started.append((client, server))
        return client, server

    yield _serve
    for client, server in started:
        await client.aclose()
        await server.stop()


async def _ok() -> bool:
    return True


async def _none() -> None:
    return None


async def _false() -> bool:
    return False


async def _raises() -> bool:
    raise ConnectionRefusedError("db down")


async def _hangs() -> bool:
    await asyncio.sleep(30)
    return True


async def test_healthz_and_readyz_when_every_check_passes(serve: Serve) -> None:
    client, server = await serve({"database": _ok, "nats": _none})
    assert server.port > 0

    live = await client.get("/healthz")
    assert live.status_code == 200
    assert live.json()["status"] == "ok"

    ready = await client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "nats"}
    assert all(check["ok"] for check in body["checks"].values())


async def test_readyz_reports_each_failing_check_and_runs_them_concurrently(serve: Serve) -> None:
    client, _ = await serve(
        {
            "database": _ok,
            "cache": _false,
            "nats": _raises,
            "slow1": _hangs,
            "slow2": _hangs,
        },
        check_timeout=0.5,
    )
    started = time.monotonic()
    response = await client.get("/readyz")
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert sorted(body["failed"]) == ["cache", "nats", "slow1", "slow2"]
    assert body["checks"]["database"]["ok"] is True
    assert "returned False" in body["checks"]["cache"]["error"]
    assert body["checks"]["nats"]["error"] == "ConnectionRefusedError: db down"
    assert "timed out" in body["checks"]["slow1"]["error"]
    # two checks that hang 0.5 s each, run one after the other, would take >= 1 s
    assert elapsed < 0.95


async def test_readyz_is_503_once_draining_while_healthz_stays_ok(serve: Serve) -> None:
    client, _ = await serve({"database": _ok})
    assert (await client.get("/readyz")).status_code == 200

    mark_draining(client.app)  # type: ignore[attr-defined]

    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "draining"
    assert (await client.get("/healthz")).status_code == 200


async def test_metrics_exposes_the_given_registry(serve: Serve) -> None:
    registry = CollectorRegistry()
    calls = Counter("ledgerlens_testsvc_calls", "calls", ["kind"], registry=registry)
    calls.labels(kind="x").inc(3)
    client, _ = await serve(registry=registry)

    text = await client.get("/metrics")
    assert text.status_code == 200
    # the Prometheus text format (0.0.4 when the scraper states no preference)
    assert text.headers["content-type"].startswith("text/plain; version=")
    assert 'ledgerlens_testsvc_calls_total{kind="x"} 3.0' in text.text

    om = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert om.headers["content-type"] == OPENMETRICS_TYPE
    assert om.text.rstrip().endswith("# EOF")


async def test_rest_facade_routers_are_served_and_documented(serve: Serve) -> None:
    router = APIRouter(prefix="/v1", tags=["documents"])

    @router.get("/documents/{doc_id}")
    async def get_document(doc_id: str) -> dict[str, str]:
        return {"id": doc_id}

    client, _ = await serve(extra_routers=[router])

    assert (await client.get("/v1/documents/abc")).json() == {"id": "abc"}
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/documents/{doc_id}" in schema["paths"]
    assert "/readyz" in schema["paths"]
    assert (await client.get("/docs")).status_code == 200


async def test_stop_closes_the_port(serve: Serve) -> None:
    client, server = await serve()
    assert (await client.get("/healthz")).status_code == 200

    await server.stop()

    assert not server.running
    with pytest.raises(httpx.ConnectError):
        await client.get("/healthz")


async def test_serving_on_a_taken_port_raises() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="could not bind"):
            await serve_ops_app(build_ops_app("testsvc"), "127.0.0.1", port)

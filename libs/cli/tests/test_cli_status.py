"""``ledgerlens status`` against a real identity service and addresses where nothing
listens, and a real gRPC server whose health says NOT_SERVING."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from _cli_support import Cli, cli_env, logged_in
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ledgerlens.runtime.net import free_port
from ledgerlens.services.identity.app import RunningIdentity

pytestmark = pytest.mark.integration

SERVICES = ("identity", "ledger", "ingestion", "retrieval", "inference")


@pytest.fixture
async def draining() -> AsyncIterator[str]:
    """A gRPC server that answers health checks with NOT_SERVING (as one shutting down)."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_every_service_serving_exits_zero(identity: RunningIdentity, tmp_path: Path) -> None:
    # the one real server stands at every address: each is asked on its own
    target = identity.grpc_address
    cli = Cli(
        cli_env(
            tmp_path, target, ingestion=target, retrieval=target, ledger=target, inference=target
        )
    )
    result = await cli("status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    assert [s["service"] for s in report["services"]] == list(SERVICES)
    assert {s["state"] for s in report["services"]} == {"serving"}
    assert report["login"].startswith("not logged in")


async def test_down_and_draining_services_exit_one_and_say_which(
    identity: RunningIdentity, draining: str, tmp_path: Path
) -> None:
    nothing = f"127.0.0.1:{free_port()}"
    cli = await logged_in(
        identity,
        tmp_path,
        ["search:read"],
        key_name="status",
        ingestion=nothing,
        retrieval=draining,
        ledger=identity.grpc_address,
        inference=nothing,
    )
    result = await cli("status", "--json")
    assert result.exit_code == 1, result.output
    states = {s["service"]: s for s in json.loads(result.stdout)["services"]}
    assert states["identity"]["state"] == "serving"
    assert states["ledger"]["state"] == "serving"
    assert states["retrieval"]["state"] == "not serving"
    assert states["ingestion"]["state"] == "unreachable"
    assert nothing in states["ingestion"]["detail"]
    assert states["inference"]["state"] == "unreachable"
    assert json.loads(result.stdout)["login"].startswith("logged in as ")

    table = await cli("status")
    assert table.exit_code == 1
    assert "Traceback" not in table.output
    for service in SERVICES:
        assert service in table.stdout
    assert "not serving" in table.stdout
    assert "unreachable" in table.stdout
    assert "token valid until" in table.stdout

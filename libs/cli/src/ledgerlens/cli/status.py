"""``ledgerlens status``: is every service up, and is this person logged in?

Each service is asked over gRPC's standard health protocol (``grpc.health.v1``, which
needs no token), all at once, each within the global ``--timeout``. The table shows the
address, the answer (serving, not serving, unreachable and why) and how long it took;
below it, whose token is cached and until when. Exit code 0 when every service serves,
1 when one does not (so scripts can wait on it), 2 on a usage error.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from ledgerlens.cli.config import CliConfig
from ledgerlens.cli.output import exit_codes

__all__ = ["ServiceHealth", "check_all", "register", "status"]

_STATES = {
    health_pb2.HealthCheckResponse.SERVING: "serving",
    health_pb2.HealthCheckResponse.NOT_SERVING: "not serving",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "service unknown",
    health_pb2.HealthCheckResponse.UNKNOWN: "unknown",
}


@dataclass(frozen=True)
class ServiceHealth:
    service: str
    target: str
    state: str
    #: why it is not serving, when it is not (the gRPC status and its details).
    detail: str
    latency_ms: float

    @property
    def serving(self) -> bool:
        return self.state == "serving"


def targets(config: CliConfig) -> dict[str, str]:
    """The five services' gRPC addresses, in the order the platform starts them."""
    return {
        "identity": config.identity_target,
        "ledger": config.ledger_target,
        "ingestion": config.ingestion_target,
        "retrieval": config.retrieval_target,
        "inference": config.inference_target,
    }


async def _check(service: str, target: str, timeout: float) -> ServiceHealth:  # noqa: ASYNC109 - the per-call deadline
    started = time.perf_counter()
    state, detail = "unreachable", ""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
            state = _STATES.get(reply.status, "unknown")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = f"{code.name}: nothing answers at {target}"
            else:
                state = "error"
                detail = f"{code.name}: {exc.details() or ''}".rstrip(": ")
    return ServiceHealth(
        service=service,
        target=target,
        state=state,
        detail=detail,
        latency_ms=round((time.perf_counter() - started) * 1000, 1),
    )


async def check_all(config: CliConfig) -> list[ServiceHealth]:
    """Every service's health, asked concurrently."""
    return list(
        await asyncio.gather(
            *(
                _check(name, target, config.timeout_seconds)
                for name, target in targets(config).items()
            )
        )
    )


def _login_line(config: CliConfig) -> str:
    credentials = config.credentials.load()
    if credentials is None:
        return "not logged in (ledgerlens login)"
    until = datetime.fromtimestamp(credentials.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    # an expired token is no problem: the next command renews it with the cached key
    state = "renewed on next use" if credentials.expires_within(0) else f"valid until {until}"
    return f"logged in as {credentials.client_id}, token {state}"


def status(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Health of every service (gRPC health protocol) and the cached login."""
    config: CliConfig = ctx.obj
    with exit_codes():
        results = asyncio.run(check_all(config))
        login = _login_line(config)
        healthy = all(result.serving for result in results)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "healthy": healthy,
                        "services": [asdict(result) for result in results],
                        "login": login,
                    },
                    indent=2,
                )
            )
        else:
            table = Table(title="ledgerlens services")
            table.add_column("service")
            table.add_column("address")
            table.add_column("health")
            table.add_column("ms", justify="right")
            for result in results:
                health = (
                    "[green]serving[/]"
                    if result.serving
                    else f"[red]{result.state}[/]" + (f"\n{result.detail}" if result.detail else "")
                )
                table.add_row(result.service, result.target, health, f"{result.latency_ms:g}")
            console = Console()
            console.print(table)
            console.print(login, highlight=False)
        if not healthy:
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("status")(status)

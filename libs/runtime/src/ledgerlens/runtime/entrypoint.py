"""``python -m ledgerlens.services.<svc> [serve|migrate|...]``, the same for every service.

:func:`service_cli` builds the typer app: ``serve`` (the default) configures logging
and tracing, runs the service's ``run_<svc>(settings)`` context manager until SIGTERM
or SIGINT (the server drains in-flight calls), and ``migrate`` brings the database to
the newest schema and exits (a Kubernetes Job runs it). A service adds its own admin
commands to the returned app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import typer
from rich.console import Console

from ledgerlens.runtime.server import ServiceServer
from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.runtime.telemetry import configure_logging, configure_tracing, shutdown_tracing

__all__ = ["Running", "service_cli"]

S = TypeVar("S", bound=ServiceSettings)


class Running(Protocol):
    """What a service's ``run_<svc>`` yields (its dataclass has at least these)."""

    @property
    def server(self) -> ServiceServer: ...

    @property
    def grpc_address(self) -> str: ...

    @property
    def http_url(self) -> str: ...


def service_cli(
    name: str,
    settings: Callable[[], S],
    run: Callable[[S], AbstractAsyncContextManager[Running]],
    migrate: Callable[[str], Coroutine[Any, Any, None]],
    *,
    help_text: str | None = None,
) -> typer.Typer:
    """The service's command line; ``settings()`` reads its settings from the environment."""
    cli = typer.Typer(add_completion=False, no_args_is_help=False, help=help_text)
    out = Console()

    async def serve(current: S) -> None:
        configure_logging(current)
        configure_tracing(current)
        async with run(current) as running:
            running.server.install_signal_handlers()
            out.print(
                f"{name}: gRPC {running.grpc_address}, HTTP {running.http_url}", highlight=False
            )
            await running.server.wait_for_termination()
        shutdown_tracing()

    @cli.command("serve")
    def serve_command() -> None:
        """Run the service (the default command)."""
        asyncio.run(serve(settings()))

    @cli.command("migrate")
    def migrate_command() -> None:
        """Bring the database to the newest schema and exit (a Kubernetes Job runs this)."""
        asyncio.run(migrate(settings().database_url))

    @cli.callback(invoke_without_command=True)
    def default(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            serve_command()

    return cli

"""``python -m ledgerlens.services.retrieval [serve|migrate]``.

``serve`` (the default) migrates the database, opens the index (loading the HNSW
snapshot or rebuilding it), loads the embedding model, then runs the gRPC API, the ops
app (``/healthz``, ``/readyz``, ``/metrics``) and the consumers that keep the index in
step with ingestion and the ledger.
"""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from ledgerlens.runtime.telemetry import configure_logging, configure_tracing, shutdown_tracing
from ledgerlens.services.retrieval.app import run_retrieval
from ledgerlens.services.retrieval.migrate import migrate
from ledgerlens.services.retrieval.settings import Settings

cli = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__)
out = Console()


async def serve(settings: Settings) -> None:
    configure_logging(settings)
    configure_tracing(settings)
    async with run_retrieval(settings) as running:
        running.server.install_signal_handlers()
        out.print(
            f"retrieval: gRPC {running.grpc_address}, HTTP {running.http_url}", highlight=False
        )
        await running.server.wait_for_termination()
    shutdown_tracing()


@cli.command("serve")
def serve_command() -> None:
    """Run the retrieval service (the default command)."""
    asyncio.run(serve(Settings()))


@cli.command("migrate")
def migrate_command() -> None:
    """Bring the database to the newest schema and exit (a Kubernetes Job runs this)."""
    asyncio.run(migrate(Settings().database_url))


@cli.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        serve_command()


if __name__ == "__main__":
    cli()

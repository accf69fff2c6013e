"""``python -m ledgerlens.services.identity [serve|create-key|rotate-key|migrate]``.

``serve`` (the default) migrates the database, then runs the gRPC API and the ops app
(``/healthz``, ``/readyz``, ``/metrics``, ``POST /oauth/token``,
``GET /.well-known/jwks.json`` and the Fabric-CA REST subset under ``/api/v1``).
``create-key`` writes an API key straight to the database, for the very first admin
key (every gRPC call needs a token, and a token needs a key).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import typer
from rich.console import Console

from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.telemetry import configure_logging, configure_tracing, shutdown_tracing
from ledgerlens.services.identity.app import run_identity
from ledgerlens.services.identity.migrate import migrate
from ledgerlens.services.identity.service import IdentityCore
from ledgerlens.services.identity.settings import Settings

cli = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__)
out = Console()


async def serve(settings: Settings) -> None:
    configure_logging(settings)
    configure_tracing(settings)
    async with run_identity(settings) as running:
        running.server.install_signal_handlers()
        out.print(
            f"identity: gRPC {running.grpc_address}, HTTP {running.http_url}", highlight=False
        )
        await running.server.wait_for_termination()
    shutdown_tracing()


@asynccontextmanager
async def _offline_core() -> AsyncIterator[IdentityCore]:
    """The domain on the configured (migrated) database, for the admin commands."""
    settings = Settings()
    await migrate(settings.database_url)
    engine = create_engine(settings.database_url)
    core = IdentityCore(settings, engine)
    try:
        yield core
    finally:
        await core.close()
        await engine.dispose()


@cli.command("serve")
def serve_command() -> None:
    """Run the identity service (the default command)."""
    asyncio.run(serve(Settings()))


@cli.command("create-key")
def create_key(
    tenant: Annotated[str, typer.Option(help="tenant that owns the key")],
    name: Annotated[str, typer.Option(help="a display name")] = "bootstrap admin",
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="a scope of the key (repeat)")
    ] = None,
) -> None:
    """Create an API key directly in the database and print its id and secret once."""
    scopes = scope or ["admin", "keys:admin"]

    async def run() -> tuple[str, str]:
        async with _offline_core() as core:
            record, secret = await core.create_key(tenant, name, scopes)
            return record.key_id, secret

    key_id, secret = asyncio.run(run())
    out.print(f"client_id:     {key_id}\nclient_secret: {secret}", highlight=False)
    out.print("The secret is shown only now; identity keeps only its hash.", style="dim")


@cli.command("rotate-key")
def rotate_key(
    algorithm: Annotated[str | None, typer.Option(help="ES256 or EdDSA")] = None,
) -> None:
    """Make a new signing key active; the previous one stays in the JWKS until its
    tokens have expired."""
    if algorithm not in (None, "ES256", "EdDSA"):
        raise typer.BadParameter("algorithm must be ES256 or EdDSA")

    async def run() -> str:
        async with _offline_core() as core:
            await core.start()
            result = await core.rotate(algorithm)  # type: ignore[arg-type]
            return f"active kid {result.kid} (previous {result.previous_kid})"

    out.print(asyncio.run(run()), highlight=False)


@cli.command("migrate")
def migrate_command() -> None:
    """Bring the database to the newest schema and exit (e.g. a Kubernetes Job)."""
    asyncio.run(migrate(Settings().database_url))


@cli.callback(invoke_without_command=True)
def default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        serve_command()


if __name__ == "__main__":
    cli()

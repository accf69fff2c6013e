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
from ledgerlens.runtime.entrypoint import service_cli
from ledgerlens.services.identity.app import run_identity
from ledgerlens.services.identity.migrate import migrate
from ledgerlens.services.identity.service import IdentityCore
from ledgerlens.services.identity.settings import Settings

cli = service_cli("identity", Settings, run_identity, migrate, help_text=__doc__)
out = Console()


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


if __name__ == "__main__":
    cli()

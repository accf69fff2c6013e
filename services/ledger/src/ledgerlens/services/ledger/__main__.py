"""``python -m ledgerlens.services.ledger [serve|migrate|enroll]``.

``serve`` (the default) migrates the database (the dev ledger's tables and the
service's own), opens the backend (the embedded dev ledger, or a Fabric network through
its Gateway peer), then runs the gRPC API, the ops app (``/healthz``, ``/readyz``,
``/metrics``), the chaincode event follower with its outbox relay, and the consumers of
ingested documents and recorded completions. ``migrate`` only migrates. ``enroll``
enrolls the Fabric identity with the identity service's CA and writes the certificate,
key and CA chain the Fabric backend reads.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from ledgerlens.runtime.entrypoint import service_cli
from ledgerlens.services.ledger.app import run_ledger
from ledgerlens.services.ledger.enroll import ENROLL_SCOPE, EnrollError, enroll_identity
from ledgerlens.services.ledger.migrate import migrate
from ledgerlens.services.ledger.settings import Settings

cli = service_cli("ledger", Settings, run_ledger, migrate, help_text=__doc__)

# the name of the env var (Settings.service_token's), not a secret
DEFAULT_TOKEN_ENV = "LEDGERLENS_LEDGER_SERVICE_TOKEN"  # noqa: S105


def _settings_token() -> str:
    try:
        secret = Settings().service_token
    except ValidationError as exc:
        typer.echo(
            f"error: invalid LEDGERLENS_LEDGER_* settings: {exc.errors()[0]['msg']}", err=True
        )
        raise typer.Exit(1) from None
    return secret.get_secret_value() if secret is not None else ""


@cli.command("enroll")
def enroll(
    identity: Annotated[str, typer.Option("--identity", help="identity's gRPC address, HOST:PORT")],
    enrollment_id: Annotated[
        str, typer.Option("--enrollment-id", help="the enrollment id (the certificate's CN)")
    ],
    msp_id: Annotated[str, typer.Option("--msp-id", help="the organisation's MSP id")],
    out: Annotated[
        Path, typer.Option("--out", help="where to write cert.pem, key.pem, ca-chain.pem")
    ],
    token_env: Annotated[
        str,
        typer.Option(
            "--token-env",
            help=f"env var holding a bearer token with scope {ENROLL_SCOPE} "
            "(else the settings' service_token)",
        ),
    ] = DEFAULT_TOKEN_ENV,
    profile: Annotated[
        str, typer.Option("--profile", help="issuance profile (empty: enrollment certificate)")
    ] = "",
    force: Annotated[bool, typer.Option("--force", help="replace an existing key")] = False,
) -> None:
    """Enroll a new P-256 key with identity's EnrollCertificate; print the Fabric settings."""
    token = os.environ.get(token_env) or _settings_token()
    if not token:
        where = (
            token_env if token_env == DEFAULT_TOKEN_ENV else f"{token_env} or {DEFAULT_TOKEN_ENV}"
        )
        typer.echo(f"error: no token: set {where} to a token with scope {ENROLL_SCOPE!r}", err=True)
        raise typer.Exit(1)
    try:
        enrolled = asyncio.run(
            enroll_identity(
                identity, token, enrollment_id, msp_id, out, profile=profile, force=force
            )
        )
    except EnrollError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    until = enrolled.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    typer.echo(
        f"# enrolled {enrolled.enrollment_id} ({enrolled.msp_id}): serial {enrolled.serial}, "
        f"valid until {until}"
    )
    typer.echo(
        f"# wrote {enrolled.certificate_path}, {enrolled.ca_chain_path} and "
        f"{enrolled.private_key_path} (mode 0600)"
    )
    typer.echo("# the Fabric backend's settings (with LEDGERLENS_LEDGER_BACKEND=fabric):")
    for line in enrolled.env_lines():
        typer.echo(line)


if __name__ == "__main__":
    cli()

"""The ``ledgerlens`` command: global options, and every command group wired in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ledgerlens.cli import ask, identity, ingest, ledger, search, status
from ledgerlens.cli.config import (
    CONFIG_DIR_ENV,
    DEFAULT_IDENTITY_TARGET,
    DEFAULT_IDENTITY_URL,
    DEFAULT_INFERENCE_TARGET,
    DEFAULT_INGESTION_TARGET,
    DEFAULT_LEDGER_TARGET,
    DEFAULT_RETRIEVAL_TARGET,
    IDENTITY_TARGET_ENV,
    IDENTITY_URL_ENV,
    INFERENCE_TARGET_ENV,
    INGESTION_TARGET_ENV,
    LEDGER_TARGET_ENV,
    RETRIEVAL_TARGET_ENV,
    CliConfig,
    default_config_dir,
)

__all__ = ["app"]

app = typer.Typer(
    name="ledgerlens",
    help="The ledgerlens platform from the command line.",
    no_args_is_help=True,
    add_completion=False,
    # a traceback's locals could hold a secret or a token: never print them
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    identity_target: Annotated[
        str,
        typer.Option(
            "--identity",
            envvar=IDENTITY_TARGET_ENV,
            help="The identity service's gRPC address (host:port).",
        ),
    ] = DEFAULT_IDENTITY_TARGET,
    identity_url: Annotated[
        str,
        typer.Option(
            "--identity-http",
            envvar=IDENTITY_URL_ENV,
            help="The identity service's HTTP base URL (JWKS, OAuth2, health).",
        ),
    ] = DEFAULT_IDENTITY_URL,
    ingestion_target: Annotated[
        str,
        typer.Option(
            "--ingestion",
            envvar=INGESTION_TARGET_ENV,
            help="The ingestion service's gRPC address (host:port).",
        ),
    ] = DEFAULT_INGESTION_TARGET,
    retrieval_target: Annotated[
        str,
        typer.Option(
            "--retrieval",
            envvar=RETRIEVAL_TARGET_ENV,
            help="The retrieval service's gRPC address (host:port).",
        ),
    ] = DEFAULT_RETRIEVAL_TARGET,
    inference_target: Annotated[
        str,
        typer.Option(
            "--inference",
            envvar=INFERENCE_TARGET_ENV,
            help="The inference service's gRPC address (host:port).",
        ),
    ] = DEFAULT_INFERENCE_TARGET,
    ledger_target: Annotated[
        str,
        typer.Option(
            "--ledger",
            envvar=LEDGER_TARGET_ENV,
            help="The ledger service's gRPC address (host:port).",
        ),
    ] = DEFAULT_LEDGER_TARGET,
    config_dir: Annotated[
        Path | None,
        typer.Option(
            "--config-dir",
            envvar=CONFIG_DIR_ENV,
            help="Where the cached credentials live (default ~/.config/ledgerlens).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Deadline of each call, in seconds.")
    ] = 10.0,
) -> None:
    ctx.obj = CliConfig(
        identity_target=identity_target,
        identity_url=identity_url.rstrip("/"),
        ingestion_target=ingestion_target,
        retrieval_target=retrieval_target,
        ledger_target=ledger_target,
        inference_target=inference_target,
        config_dir=config_dir if config_dir is not None else default_config_dir(),
        timeout_seconds=timeout,
    )


identity.register(app)
ingest.register(app)
search.register(app)
ledger.register(app)
ask.register(app)
status.register(app)


if __name__ == "__main__":
    app(prog_name="ledgerlens")

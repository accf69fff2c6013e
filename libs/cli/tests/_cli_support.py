"""Test support of the CLI tests (imported by name: tests are not a package)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner, Result

from ledgerlens.cli.main import app
from ledgerlens.services.identity.app import RunningIdentity, run_identity
from ledgerlens.services.identity.settings import Settings as IdentitySettings


@asynccontextmanager
async def identity_service(
    database_url: str, nats_url: str, data_dir: Path
) -> AsyncIterator[RunningIdentity]:
    """A real identity service on free ports, for the commands to log in against."""
    settings = IdentitySettings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        http_port=0,
        data_dir=str(data_dir),
        shutdown_grace_seconds=1,
    )
    async with run_identity(settings) as running:
        yield running


@dataclass
class Cli:
    """``ledgerlens ...`` in-process, in a thread, with this test's environment."""

    env: dict[str, str]

    async def __call__(self, *args: str) -> Result:
        def invoke() -> Result:
            return CliRunner().invoke(app, list(args), env=self.env)

        return await asyncio.to_thread(invoke)


def cli_env(config_dir: Path, identity: str, **targets: str) -> dict[str, str]:
    """The environment of one test's CLI: its own config dir, and the services' targets
    (``ingestion=...`` becomes ``LEDGERLENS_INGESTION_TARGET``)."""
    env = {
        "LEDGERLENS_CONFIG_DIR": str(config_dir),
        "LEDGERLENS_IDENTITY_TARGET": identity,
        "LEDGERLENS_CLIENT_SECRET": "",  # never the environment's, if any
        "COLUMNS": "250",  # whole URLs, paths, ids and messages in the tables
    }
    for service, target in targets.items():
        env[f"LEDGERLENS_{service.upper()}_TARGET"] = target
    return env


def assert_one_line_error(result: Result, exit_code: int, *needles: str) -> str:
    """The command failed with ``exit_code`` and one line on stderr holding ``needles``
    (no traceback, nothing on stdout); returns the line."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


async def logged_in(
    identity: RunningIdentity,
    config_dir: Path,
    scopes: Sequence[str],
    *,
    key_name: str,
    **targets: str,
) -> Cli:
    """A CLI logged in (``ledgerlens login``) with a new key of ``scopes`` in tenant
    ``acme``; ``targets`` as for :func:`cli_env`."""
    record, secret = await identity.core.create_key("acme", key_name, list(scopes))
    cli = Cli(cli_env(config_dir, identity.grpc_address, **targets))
    result = await cli("login", "--client-id", record.key_id, "--client-secret", secret)
    assert result.exit_code == 0, result.output
    return cli

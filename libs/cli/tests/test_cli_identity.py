"""The ``ledgerlens`` identity commands against a real identity service on real sockets.

The service runs in the test's event loop (``run_identity``); the CLI runs in-process
through typer's ``CliRunner`` in a worker thread, with its own event loop, exactly as
the command would in a shell.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from _cli_support import assert_one_line_error
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner, Result

from ledgerlens.cli.main import app
from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.net import free_port
from ledgerlens.services.identity.app import RunningIdentity

pytestmark = pytest.mark.integration

ADMIN_SCOPES = ["admin", "keys:admin", "certs:enroll", "tokens:introspect"]


@dataclass
class Cli:
    """``ledgerlens ...`` in-process, in a thread, with this test's environment."""

    env: dict[str, str]
    config_dir: Path

    async def __call__(self, *args: str, input: str | None = None) -> Result:
        def invoke() -> Result:
            return CliRunner().invoke(app, list(args), env=self.env, input=input)

        return await asyncio.to_thread(invoke)

    @property
    def credentials_file(self) -> Path:
        return self.config_dir / "credentials.json"

    def cached(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.credentials_file.read_text())
        return data


@pytest.fixture
async def admin(identity: RunningIdentity) -> tuple[str, str]:
    record, secret = await identity.core.create_key("acme", "admin", ADMIN_SCOPES)
    return record.key_id, secret


def _env(config_dir: Path, target: str, http_url: str = "http://127.0.0.1:1") -> dict[str, str]:
    return {
        "LEDGERLENS_CONFIG_DIR": str(config_dir),
        "LEDGERLENS_IDENTITY_TARGET": target,
        "LEDGERLENS_IDENTITY_URL": http_url,
        "LEDGERLENS_CLIENT_SECRET": "",  # never the environment's, if any
        "COLUMNS": "250",  # rich tables wide enough for whole key ids
    }


@pytest.fixture
def cli(identity: RunningIdentity, tmp_path: Path) -> Cli:
    config_dir = tmp_path / "config"
    return Cli(_env(config_dir, identity.grpc_address, identity.http_url), config_dir)


@pytest.fixture
async def logged_in(cli: Cli, admin: tuple[str, str]) -> Cli:
    result = await cli("login", "--client-id", admin[0], "--client-secret", admin[1])
    assert result.exit_code == 0, result.output
    return cli


@pytest.fixture
async def stub(identity: RunningIdentity) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(identity.grpc_address) as channel:
        yield identity_pb2_grpc.IdentityServiceStub(channel)


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return data


def _field(stdout: str, label: str) -> str:
    for line in stdout.splitlines():
        if line.startswith(f"{label}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {label!r} line in {stdout!r}")


# -- login and the cache ---------------------------------------------------------------


async def test_login_caches_the_key_and_token_in_a_private_file(
    logged_in: Cli, admin: tuple[str, str]
) -> None:
    path = logged_in.credentials_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    cached = logged_in.cached()
    assert cached["client_id"] == admin[0]
    assert cached["client_secret"] == admin[1]
    assert len(cached["access_token"].split(".")) == 3
    assert cached["expires_at"] > time.time() + 60
    assert sorted(cached["scopes"]) == sorted(ADMIN_SCOPES)
    assert _claims(cached["access_token"])["sub"] == admin[0]


async def test_login_prompts_for_the_secret_when_not_given(
    cli: Cli, admin: tuple[str, str]
) -> None:
    result = await cli("login", "--client-id", admin[0], input=admin[1] + "\n")
    assert result.exit_code == 0, result.output
    assert admin[1] not in result.output  # hidden input is not echoed
    assert cli.cached()["client_secret"] == admin[1]


async def test_a_bad_secret_is_one_unauthenticated_line(cli: Cli, admin: tuple[str, str]) -> None:
    result = await cli("login", "--client-id", admin[0], "--client-secret", "not-the-secret")
    line = assert_one_line_error(result, 1, "UNAUTHENTICATED")
    assert "not-the-secret" not in line
    assert not cli.credentials_file.exists()


async def test_an_unreachable_identity_names_the_address(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    cli = Cli(_env(tmp_path / "config", target), tmp_path / "config")
    result = await cli("login", "--client-id", "llk_x", "--client-secret", "y")
    assert_one_line_error(result, 1, "cannot reach identity", target)


async def test_not_logged_in_says_to_log_in(cli: Cli) -> None:
    for args in (("token",), ("keys", "list"), ("certs", "revoke", "--serial", "ab")):
        result = await cli(*args)
        assert_one_line_error(result, 1, "not logged in", "ledgerlens login")


# -- token -----------------------------------------------------------------------------


async def test_token_prints_a_jwt_and_nothing_else(logged_in: Cli) -> None:
    result = await logged_in("token")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    token = result.stdout.removesuffix("\n")
    assert result.stdout == token + "\n"
    assert len(token.split(".")) == 3
    assert token == logged_in.cached()["access_token"]  # the cached one, still fresh

    narrowed = await logged_in("token", "--scope", "certs:enroll")
    assert narrowed.exit_code == 0, narrowed.output
    assert _claims(narrowed.stdout.strip())["scope"] == "certs:enroll"


async def test_an_expired_cached_token_is_replaced(logged_in: Cli) -> None:
    cached = logged_in.cached()
    old_token = cached["access_token"]
    cached["expires_at"] = time.time() - 5
    logged_in.credentials_file.write_text(json.dumps(cached))

    result = await logged_in("keys", "list")
    assert result.exit_code == 0, result.output
    refreshed = logged_in.cached()
    assert refreshed["access_token"] != old_token
    assert refreshed["expires_at"] > time.time() + 60
    assert stat.S_IMODE(logged_in.credentials_file.stat().st_mode) == 0o600


async def test_a_token_about_to_expire_is_replaced(logged_in: Cli) -> None:
    cached = logged_in.cached()
    cached["expires_at"] = time.time() + 10  # within the 30 s margin
    logged_in.credentials_file.write_text(json.dumps(cached))
    result = await logged_in("token")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() != cached["access_token"]
    assert result.stdout.strip() == logged_in.cached()["access_token"]


# -- keys ------------------------------------------------------------------------------


async def test_keys_create_list_revoke(logged_in: Cli, stub: Any) -> None:
    created = await logged_in(
        "keys", "create", "--name", "reader", "--scope", "search:read", "--expires", "2099-01-01"
    )
    assert created.exit_code == 0, created.output
    key_id = _field(created.stdout, "key id")
    secret = _field(created.stdout, "secret")
    assert key_id.startswith("llk_")
    assert secret
    assert "only this once" in created.stderr

    issued = await stub.IssueToken(
        identity_pb2.IssueTokenRequest(client_id=key_id, client_secret=secret)
    )
    assert _claims(issued.access_token)["scope"] == "search:read"

    listed = await logged_in("keys", "list")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if key_id in line)
    assert "reader" in row
    assert "search:read" in row
    assert "active" in row
    assert "2099-01-01" in row
    assert secret not in listed.stdout

    revoked = await logged_in("keys", "revoke", key_id, "--reason", "test over")
    assert revoked.exit_code == 0, revoked.output
    assert key_id in revoked.stdout

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.IssueToken(
            identity_pb2.IssueTokenRequest(client_id=key_id, client_secret=secret)
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    active_only = await logged_in("keys", "list")
    assert key_id not in active_only.stdout
    everything = await logged_in("keys", "list", "--all")
    row = next(line for line in everything.stdout.splitlines() if key_id in line)
    assert "revoked" in row


async def test_field_violations_are_on_the_error_line(logged_in: Cli) -> None:
    result = await logged_in("keys", "create", "--name", "x", "--scope", "no:such-scope")
    assert_one_line_error(result, 1, "INVALID_ARGUMENT", "scopes")


async def test_a_missing_scope_is_permission_denied(cli: Cli, identity: RunningIdentity) -> None:
    record, secret = await identity.core.create_key("acme", "reader", ["search:read"])
    login = await cli("login", "--client-id", record.key_id, "--client-secret", secret)
    assert login.exit_code == 0, login.output
    result = await cli("keys", "list")
    assert_one_line_error(result, 1, "PERMISSION_DENIED")


async def test_usage_errors_exit_2(logged_in: Cli) -> None:
    bad_date = await logged_in("keys", "create", "--name", "x", "--scope", "a", "--expires", "soon")
    assert bad_date.exit_code == 2
    neither = await logged_in("certs", "revoke")
    assert neither.exit_code == 2
    both = await logged_in("certs", "revoke", "--serial", "ab", "--id", "user1")
    assert both.exit_code == 2
    for result in (bad_date, neither, both):
        assert "Traceback" not in result.output


# -- certificates ----------------------------------------------------------------------


async def test_certs_enroll_writes_an_msp_and_revoke_puts_it_on_the_crl(
    logged_in: Cli, stub: Any, tmp_path: Path
) -> None:
    out = tmp_path / "msp"
    result = await logged_in(
        "certs", "enroll", "--id", "peer0", "--role", "peer", "--affiliation", "org1",
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    msp = out / "peer0"
    cert = x509.load_pem_x509_certificate((msp / "signcerts" / "cert.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((msp / "cacerts" / "ca.pem").read_bytes())
    key_file = msp / "keystore" / "key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)

    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key.public_key()
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == "peer0"
    ous = [
        a.value
        for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    assert "peer" in ous

    again = await logged_in("certs", "enroll", "--id", "peer0", "--out", str(out))
    assert_one_line_error(again, 1, "--force")

    serial = format(cert.serial_number, "x")
    revoked = await logged_in("certs", "revoke", "--serial", serial, "--reason", "keycompromise")
    assert revoked.exit_code == 0, revoked.output
    assert serial in revoked.stdout

    crl_response = await stub.GetCrl(identity_pb2.GetCrlRequest())
    crl = x509.load_der_x509_crl(crl_response.crl)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise


async def test_certs_revoke_by_enrollment_id(logged_in: Cli, tmp_path: Path) -> None:
    for _ in range(2):
        enrolled = await logged_in(
            "certs", "enroll", "--id", "user7", "--out", str(tmp_path / "m"), "--force"
        )
        assert enrolled.exit_code == 0, enrolled.output
    result = await logged_in("certs", "revoke", "--id", "user7")
    assert result.exit_code == 0, result.output
    assert "Revoked 2 certificate(s)" in result.stdout
    unknown = await logged_in("certs", "revoke", "--id", "nobody")
    assert_one_line_error(unknown, 1, "NOT_FOUND")

"""``python -m ledgerlens.services.ledger enroll`` against the real identity service
(real gRPC, its own token checks and CA), then the written files used as the Fabric
backend's identity against a ``TestPeer``.

What "the organisation trusts that CA" can mean here: ``TestPeer`` admits a creator by
its MSP id and verifies every signature against the creator certificate carried in the
message, but it cannot be given a CA to check that certificate's chain against. So the
chain is checked with ``cryptography`` (it verifies the certificate up to identity's
root, the CA an MSP's ``cacerts`` would hold), the proposal signatures are checked with
``ledgerlens.fabric.identity.verify_signature`` against the enrolled certificate, and
the backend built from the printed settings commits a transaction on the TestPeer.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import socket
import stat
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from _cli_support import assert_one_line_error, identity_service
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from fabric_protos.gateway import gateway_pb2
from typer.testing import CliRunner, Result

from ledgerlens.fabric import Gateway, connect, load_identity, load_signer
from ledgerlens.fabric.identity import Identity, digest, verify_signature
from ledgerlens.fabric.testing import TestPeer
from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.services.identity.app import RunningIdentity
from ledgerlens.services.ledger.__main__ import cli
from ledgerlens.services.ledger.backend import FabricBackend
from ledgerlens.services.ledger.contract import AnchoringContract
from ledgerlens.services.ledger.enroll import EnrollError, enroll_identity
from ledgerlens.services.ledger.settings import Settings

pytestmark = pytest.mark.integration

MSP = "Org1MSP"
ENROLLMENT_ID = "ledger-gateway-client"
TOKEN_ENV = "LEDGERLENS_LEDGER_SERVICE_TOKEN"


@pytest.fixture
async def identity(
    sqlite_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[RunningIdentity]:
    async with identity_service(sqlite_url, nats_url, tmp_path / "identity-data") as running:
        yield running


async def token_with(identity: RunningIdentity, scopes: Sequence[str]) -> str:
    """A real token from identity (an API key of ``scopes``, then ``IssueToken``)."""
    record, secret = await identity.core.create_key("acme", "ledger enroll", list(scopes))
    async with grpc.aio.insecure_channel(identity.grpc_address) as channel:
        issued = await identity_pb2_grpc.IdentityServiceStub(channel).IssueToken(
            identity_pb2.IssueTokenRequest(client_id=record.key_id, client_secret=secret)
        )
    return str(issued.access_token)


async def ledger_cli(*args: str, env: dict[str, str]) -> Result:
    """``python -m ledgerlens.services.ledger ...`` in-process, in a thread (its own loop)."""
    return await asyncio.to_thread(lambda: CliRunner().invoke(cli, list(args), env=env))


def enroll_args(identity: str, out: Path, *extra: str) -> list[str]:
    return [
        "enroll",
        "--identity",
        identity,
        "--enrollment-id",
        ENROLLMENT_ID,
        "--msp-id",
        MSP,
        "--out",
        str(out),
        *extra,
    ]


def printed_env(stdout: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in stdout.splitlines() if line and not line.startswith("#")
    )


def public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


async def ca_chain(identity: RunningIdentity) -> list[x509.Certificate]:
    async with grpc.aio.insecure_channel(identity.grpc_address) as channel:
        info = await identity_pb2_grpc.IdentityServiceStub(channel).GetCaInfo(
            identity_pb2.GetCaInfoRequest()
        )
    return [x509.load_pem_x509_certificate(pem.encode()) for pem in info.chain_pem]


async def test_enrolled_files_are_the_fabric_backends_identity(
    identity: RunningIdentity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await token_with(identity, ["certs:enroll"])
    out = tmp_path / "ledger-msp"
    result = await ledger_cli(*enroll_args(identity.grpc_address, out), env={TOKEN_ENV: token})
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "PRIVATE KEY" not in result.output
    assert token not in result.output
    env = printed_env(result.stdout)
    assert env == {
        "LEDGERLENS_LEDGER_FABRIC__MSP_ID": MSP,
        "LEDGERLENS_LEDGER_FABRIC__CERTIFICATE_PATH": str(out / "cert.pem"),
        "LEDGERLENS_LEDGER_FABRIC__PRIVATE_KEY_PATH": str(out / "key.pem"),
    }

    # the files: the key is private, the certificate is for it, CN = enrollment id
    key_path, cert_path = out / "key.pem", out / "cert.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert public_der(certificate.public_key()) == public_der(key.public_key())
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [ENROLLMENT_ID]
    now = datetime.datetime.now(datetime.UTC)
    assert certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc

    # the chain verifies the certificate up to identity's root, the CA identity publishes
    chain = x509.load_pem_x509_certificates((out / "ca-chain.pem").read_bytes())
    assert chain == await ca_chain(identity)
    certificate.verify_directly_issued_by(chain[0])
    for child, parent in itertools.pairwise(chain):
        child.verify_directly_issued_by(parent)
    chain[-1].verify_directly_issued_by(chain[-1])  # a self-signed root

    # ledgerlens.fabric loads them; a Gateway signs proposals the enrolled cert verifies
    fabric_identity = load_identity(MSP, cert_path)
    signer = load_signer(key_path)
    assert public_der(signer.public_key) == public_der(certificate.public_key())
    async with TestPeer(
        channel="ledgerlens", organizations=[MSP], chaincodes=[AnchoringContract()]
    ) as peer:
        async with Gateway(connect(peer.address), fabric_identity, signer) as gateway:
            assert Identity.from_serialized(gateway.creator) == fabric_identity
            proposal = (
                gateway.network("ledgerlens")
                .contract("anchoring")
                .new_proposal("History", ["doc-1"])
            )
            # the bytes a peer receives, hashed as a peer hashes them
            sent = gateway_pb2.ProposedTransaction.FromString(proposal.bytes()).proposal
            verify_signature(
                fabric_identity.certificate_pem, digest(sent.proposal_bytes), sent.signature
            )
            assert await proposal.evaluate() is not None  # the peer verified it too

        # the printed settings are all the Fabric backend needs besides the peer
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("LEDGERLENS_LEDGER_BACKEND", "fabric")
        monkeypatch.setenv("LEDGERLENS_LEDGER_FABRIC__PEER_ADDRESS", peer.address)
        backend = FabricBackend.from_settings(Settings())
        try:
            submitted = await backend.submit(
                "anchoring",
                "AnchorDocument",
                [b"doc-1", b"1", b"ab" * 32, b"https://x", b"2026-11-30T00:00:00Z"],
            )
        finally:
            await backend.close()
    assert submitted.status.state == "valid"
    assert submitted.status.block_number is not None
    assert submitted.status.block_number >= 1


async def test_enroll_identity_from_code_on_a_channel(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    token = await token_with(identity, ["certs:enroll"])
    async with grpc.aio.insecure_channel(identity.grpc_address) as channel:
        enrolled = await enroll_identity(channel, token, ENROLLMENT_ID, MSP, tmp_path / "msp")
    assert enrolled.certificate_path == tmp_path / "msp" / "cert.pem"
    assert enrolled.private_key_path == tmp_path / "msp" / "key.pem"
    assert enrolled.ca_chain_path == tmp_path / "msp" / "ca-chain.pem"
    certificate = x509.load_pem_x509_certificate(enrolled.certificate_path.read_bytes())
    assert format(certificate.serial_number, "x") == enrolled.serial.lstrip("0")
    assert enrolled.fabric_env()["LEDGERLENS_LEDGER_FABRIC__MSP_ID"] == MSP


async def test_a_token_without_the_scope_is_permission_denied_naming_it(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    token = await token_with(identity, ["ledger:read"])
    out = tmp_path / "msp"
    result = await ledger_cli(*enroll_args(identity.grpc_address, out), env={TOKEN_ENV: token})
    assert_one_line_error(result, 1, "PERMISSION_DENIED", "certs:enroll")
    assert not (out / "key.pem").exists()
    assert not (out / "cert.pem").exists()


async def test_a_bad_token_is_unauthenticated(identity: RunningIdentity, tmp_path: Path) -> None:
    result = await ledger_cli(
        *enroll_args(identity.grpc_address, tmp_path / "msp", "--token-env", "MY_TOKEN"),
        env={"MY_TOKEN": "not.a.token"},
    )
    line = assert_one_line_error(result, 1, "UNAUTHENTICATED", "certs:enroll")
    assert "not.a.token" not in line


async def test_no_token_is_refused_before_any_call(tmp_path: Path) -> None:
    result = await ledger_cli(
        *enroll_args("127.0.0.1:1", tmp_path / "msp", "--token-env", "UNSET_TOKEN_VAR"),
        env={"UNSET_TOKEN_VAR": "", TOKEN_ENV: ""},
    )
    assert_one_line_error(result, 1, "no token", "UNSET_TOKEN_VAR", "certs:enroll")


async def test_an_existing_key_is_kept_without_force(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    token = await token_with(identity, ["certs:enroll"])
    out = tmp_path / "msp"
    first = await ledger_cli(*enroll_args(identity.grpc_address, out), env={TOKEN_ENV: token})
    assert first.exit_code == 0, first.output
    key_before = (out / "key.pem").read_bytes()
    cert_before = (out / "cert.pem").read_bytes()

    refused = await ledger_cli(*enroll_args(identity.grpc_address, out), env={TOKEN_ENV: token})
    assert_one_line_error(refused, 1, str(out / "key.pem"), "exists", "--force")
    assert (out / "key.pem").read_bytes() == key_before
    assert (out / "cert.pem").read_bytes() == cert_before

    forced = await ledger_cli(
        *enroll_args(identity.grpc_address, out, "--force"), env={TOKEN_ENV: token}
    )
    assert forced.exit_code == 0, forced.output
    assert (out / "key.pem").read_bytes() != key_before
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), password=None)
    certificate = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert public_der(certificate.public_key()) == public_der(key.public_key())


async def test_invalid_argument_names_the_violations(
    identity: RunningIdentity, tmp_path: Path
) -> None:
    token = await token_with(identity, ["certs:enroll"])
    result = await ledger_cli(
        *enroll_args(identity.grpc_address, tmp_path / "msp", "--profile", "no-such-profile"),
        env={TOKEN_ENV: token},
    )
    assert_one_line_error(result, 1, "INVALID_ARGUMENT", "profile:")
    assert not (tmp_path / "msp" / "key.pem").exists()


async def test_unreachable_identity_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"
    result = await ledger_cli(*enroll_args(target, tmp_path / "msp"), env={TOKEN_ENV: "t"})
    assert_one_line_error(result, 1, f"cannot reach identity at {target}", "UNAVAILABLE")
    with pytest.raises(EnrollError, match="cannot reach identity"):
        await enroll_identity(target, "t", ENROLLMENT_ID, MSP, tmp_path / "msp", call_timeout=3)

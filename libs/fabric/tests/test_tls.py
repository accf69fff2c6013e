"""TLS and mutual TLS to the peer, with a throwaway CA made by cryptography."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kv_chaincode import KeyValueChaincode

from ledgerlens.fabric import EvaluateError, Gateway, connect
from ledgerlens.fabric.identity import ECDSASigner, Identity
from ledgerlens.fabric.testing import TestPeer

PEER_HOST = "peer0.org1.example.com"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem  # SANs: 127.0.0.1 and PEER_HOST
    named_server: Pem  # SAN: PEER_HOST only
    client: Pem
    other_ca: Pem


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca(cn: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), cert, key


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_cert, ca_key = _ca("tlsca.org1.example.com")
    server_auth = ExtendedKeyUsageOID.SERVER_AUTH
    return Pki(
        ca=ca,
        server=_leaf(
            ca_cert,
            ca_key,
            PEER_HOST,
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(PEER_HOST)],
            server_auth,
        ),
        named_server=_leaf(ca_cert, ca_key, PEER_HOST, [x509.DNSName(PEER_HOST)], server_auth),
        client=_leaf(
            ca_cert,
            ca_key,
            "client.org1",
            [x509.DNSName("client.org1")],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
        other_ca=_ca("someone-else")[0],
    )


async def _peer(server: Pem, client_ca: bytes | None = None) -> TestPeer:
    credentials = grpc.ssl_server_credentials(
        [(server.key, server.cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return await TestPeer(chaincodes=[KeyValueChaincode()], server_credentials=credentials).start()


@pytest.fixture
async def tls_peer(pki: Pki) -> AsyncIterator[TestPeer]:
    peer = await _peer(pki.server)
    yield peer
    await peer.stop()


@pytest.fixture
async def mtls_peer(pki: Pki) -> AsyncIterator[TestPeer]:
    peer = await _peer(pki.server, client_ca=pki.ca.cert)
    yield peer
    await peer.stop()


Client = tuple[Identity, ECDSASigner, bytes]


async def _evaluate(channel: grpc.aio.Channel, client: Client) -> bytes:
    identity, signer, _ = client
    async with Gateway(channel, identity, signer) as gateway:
        return await gateway.network("mychannel").contract("kv").evaluate("put", ["t", b"ok"])


async def test_tls(pki: Pki, tls_peer: TestPeer, client_identity: Client) -> None:
    channel = connect(tls_peer.address, tls_root_certificates=pki.ca.cert)
    assert await _evaluate(channel, client_identity) == b"ok"


async def test_tls_with_server_name_override(pki: Pki, client_identity: Client) -> None:
    peer = await _peer(pki.named_server)
    try:
        channel = connect(
            peer.address, tls_root_certificates=pki.ca.cert, server_name_override=PEER_HOST
        )
        assert await _evaluate(channel, client_identity) == b"ok"
    finally:
        await peer.stop()


async def test_tls_rejects_an_untrusted_peer(
    pki: Pki, tls_peer: TestPeer, client_identity: Client
) -> None:
    channel = connect(tls_peer.address, tls_root_certificates=pki.other_ca.cert)
    with pytest.raises(EvaluateError) as caught:
        await _evaluate(channel, client_identity)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls(pki: Pki, mtls_peer: TestPeer, client_identity: Client) -> None:
    channel = connect(
        mtls_peer.address,
        tls_root_certificates=pki.ca.cert,
        client_certificate=pki.client.cert,
        client_key=pki.client.key,
    )
    assert await _evaluate(channel, client_identity) == b"ok"


async def test_mutual_tls_refuses_a_client_without_certificate(
    pki: Pki, mtls_peer: TestPeer, client_identity: Client
) -> None:
    channel = connect(mtls_peer.address, tls_root_certificates=pki.ca.cert)
    with pytest.raises(EvaluateError) as caught:
        await _evaluate(channel, client_identity)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_connect_validates_mutual_tls_arguments(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both"):
        connect("127.0.0.1:1", tls_root_certificates=pki.ca.cert, client_certificate=b"x")
    with pytest.raises(ValueError, match="tls_root_certificates"):
        connect("127.0.0.1:1", client_certificate=b"x", client_key=b"y")

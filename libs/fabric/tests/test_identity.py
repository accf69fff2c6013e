"""Loading an enrolled identity (certificate + key files) and using it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ledgerlens.fabric import ECDSASigner, Gateway, connect, load_identity, load_signer
from ledgerlens.fabric.identity import Identity
from ledgerlens.fabric.testing import TestPeer


async def test_identity_and_signer_from_files(
    tmp_path: Path, peer: TestPeer, client_identity: tuple[Identity, ECDSASigner, bytes]
) -> None:
    identity, _, key_pem = client_identity
    (tmp_path / "signcerts").mkdir()
    (tmp_path / "keystore").mkdir()
    (tmp_path / "signcerts" / "cert.pem").write_bytes(identity.certificate_pem)
    (tmp_path / "keystore" / "key_sk").write_bytes(key_pem)

    loaded = load_identity("Org1MSP", tmp_path / "signcerts" / "cert.pem")
    assert loaded == identity
    assert Identity.from_serialized(loaded.serialized()) == identity
    signer = load_signer(tmp_path / "keystore" / "key_sk")
    async with Gateway(connect(peer.address), loaded, signer) as gateway:
        result = await gateway.network("mychannel").contract("kv").submit("put", ["f", b"1"])
    assert result.status.successful


def test_signer_refuses_non_ecdsa_keys() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - test only
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(TypeError, match="ECDSA"):
        ECDSASigner.from_pem(pem)

"""Who signs: an X.509 identity in an MSP, and the key that signs on its behalf.

Fabric verifies every proposal, transaction, commit-status and events request against
the creator certificate carried inside the message, so the client needs the PEM
certificate (what it claims to be) and a :class:`Signer` (proof that it is). They are
separate because the key may live elsewhere (an HSM, a KMS, another process): the
gateway then runs with ``signer=None`` and the caller signs digests offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from fabric_protos.msp import identities_pb2

__all__ = [
    "ECDSASigner",
    "Identity",
    "Signer",
    "digest",
    "is_low_s",
    "load_identity",
    "load_signer",
    "to_low_s",
    "verify_signature",
]

# Order of the P-256 group. cryptography does not expose curve orders, and Fabric's
# low-S rule is defined against it, so the constant is spelled out (FIPS 186-4, D.1.2.3).
_CURVE_ORDERS: dict[str, int] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
}


def digest(message: bytes) -> bytes:
    """SHA-256, the hash Fabric's default MSP signs and verifies."""
    return hashlib.sha256(message).digest()


@dataclass(frozen=True)
class Identity:
    """An MSP member: the MSP id and its PEM certificate, as Fabric serialises it."""

    msp_id: str
    certificate_pem: bytes

    def serialized(self) -> bytes:
        """``msp.SerializedIdentity`` bytes: the creator field of every request."""
        message = identities_pb2.SerializedIdentity(
            mspid=self.msp_id, id_bytes=self.certificate_pem
        )
        return bytes(message.SerializeToString())

    @classmethod
    def from_serialized(cls, data: bytes) -> Identity:
        message = identities_pb2.SerializedIdentity.FromString(data)
        return cls(msp_id=message.mspid, certificate_pem=bytes(message.id_bytes))

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)


class Signer(Protocol):
    """Signs a SHA-256 digest; returns a DER ECDSA signature Fabric accepts (low-S)."""

    def sign(self, digest: bytes) -> bytes: ...


def _order(curve: ec.EllipticCurve) -> int:
    try:
        return _CURVE_ORDERS[curve.name]
    except KeyError:
        raise ValueError(f"unsupported curve for Fabric signatures: {curve.name}") from None


def to_low_s(signature: bytes, curve: ec.EllipticCurve) -> bytes:
    """Fabric rejects ECDSA signatures whose S is above half the group order (they are
    malleable: (r, n - s) verifies too); rewrite such a signature as its low-S twin."""
    r, s = decode_dss_signature(signature)
    n = _order(curve)
    if s > n // 2:
        s = n - s
    return encode_dss_signature(r, s)


def is_low_s(signature: bytes, curve: ec.EllipticCurve) -> bool:
    _, s = decode_dss_signature(signature)
    return s <= _order(curve) // 2


class ECDSASigner:
    """An ECDSA private key signing digests deterministically (RFC 6979), low-S.

    Determinism matters beyond hygiene: a transaction signed offline and the same one
    signed online carry byte-identical signatures, so either can be checked against
    the other.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        _order(key.curve)  # fail early on a curve Fabric's MSP would not accept
        self._key = key

    @classmethod
    def from_pem(cls, key_pem: bytes, password: bytes | None = None) -> ECDSASigner:
        key = serialization.load_pem_private_key(key_pem, password=password)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("a Fabric signing key must be an ECDSA private key")
        return cls(key)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, digest: bytes) -> bytes:
        algorithm = ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True)
        return to_low_s(self._key.sign(digest, algorithm), self._key.curve)


def verify_signature(certificate_pem: bytes, digest: bytes, signature: bytes) -> None:
    """Checks ``signature`` over ``digest`` as a Fabric peer does: a valid ECDSA
    signature by the certificate's key, in low-S form. Raises ``InvalidSignature``."""
    public_key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidSignature("the certificate's key is not an ECDSA key")
    try:
        low_s = is_low_s(signature, public_key.curve)
    except ValueError as exc:
        raise InvalidSignature(f"malformed DER signature: {exc}") from exc
    if not low_s:
        raise InvalidSignature("invalid S: must be smaller than half the curve order (high-S)")
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def load_identity(msp_id: str, certificate_path: str | Path) -> Identity:
    """The identity from a PEM certificate file (e.g. ``msp/signcerts/cert.pem`` after
    ``fabric-ca-client enroll``, or the certificate from identity's EnrollCertificate)."""
    return Identity(msp_id=msp_id, certificate_pem=Path(certificate_path).read_bytes())


def load_signer(key_path: str | Path, password: bytes | None = None) -> ECDSASigner:
    """The signer from a PEM private key file (e.g. the one in ``msp/keystore/``)."""
    return ECDSASigner.from_pem(Path(key_path).read_bytes(), password=password)

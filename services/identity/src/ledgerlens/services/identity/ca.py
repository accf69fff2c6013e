"""The certificate authority for ledger identities (Fabric CA style).

It registers enrollment identities (secrets stored as scrypt hashes), enrolls PKCS#10
CSRs into X.509 certificates usable as Fabric MSP identities, revokes them with
RFC 5280 reasons and publishes signed CRLs. All cryptography is ``cryptography``'s;
this module only decides what goes into a certificate and who may have one.

The CA's key comes from PEM files (``ca_cert_file`` / ``ca_key_file``: files or a
mounted Kubernetes TLS Secret directory); without them a self-signed development CA
is created once under ``<data_dir>/ca/`` and reused. The key never enters the
database: ``ca_store`` holds certificates and hashes only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ledgerlens.runtime.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

from .ca_store import Attribute, CaStore, IdentityRecord, IssuedRecord
from .settings import Settings

__all__ = [
    "ATTRIBUTES_OID",
    "Attribute",
    "AttributeRequest",
    "CaConfigurationError",
    "CaInfo",
    "CaMaterial",
    "CertificateAuthority",
    "CertificateHolder",
    "Crl",
    "IssuedCertificate",
    "RevokeResult",
    "Role",
    "create_dev_ca",
    "hash_secret",
    "load_ca_material",
    "normalize_serial",
    "parse_reason",
    "verify_secret",
]

#: Fabric CA's attribute extension: JSON ``{"attrs": {name: value}}``.
ATTRIBUTES_OID = x509.ObjectIdentifier("1.2.3.4.5.6.7.8.1")

#: limits of the contract (identity.proto EnrollCertificateRequest).
MAX_ENROLLMENT_ID = 64
MAX_CSR_BYTES = 16 * 1024
MAX_ATTRIBUTES = 20
MAX_ATTRIBUTE_NAME = 64
MAX_ATTRIBUTE_VALUE = 1024
MAX_AFFILIATION = 255
PROFILES = ("", "tls")

DEV_CA_YEARS = 15
DEFAULT_CRL_VALIDITY = timedelta(days=1)
#: issued certificates start a little in the past, so a peer whose clock lags accepts them.
BACKDATE = timedelta(minutes=1)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY_FILE_MODE = 0o600


class Role(StrEnum):
    """The Fabric role (``hf.Type``) of an identity; the first OU of its certificates."""

    CLIENT = "client"
    PEER = "peer"
    ADMIN = "admin"
    ORDERER = "orderer"


#: RFC 5280 CRLReason codes (7 is unused, 8 removeFromCRL is for delta CRLs only).
_REASONS: dict[int, x509.ReasonFlags] = {
    0: x509.ReasonFlags.unspecified,
    1: x509.ReasonFlags.key_compromise,
    2: x509.ReasonFlags.ca_compromise,
    3: x509.ReasonFlags.affiliation_changed,
    4: x509.ReasonFlags.superseded,
    5: x509.ReasonFlags.cessation_of_operation,
    6: x509.ReasonFlags.certificate_hold,
    9: x509.ReasonFlags.privilege_withdrawn,
    10: x509.ReasonFlags.aa_compromise,
}
#: Fabric CA's reason names (``fabric-ca-client revoke -r``), compared without
#: case, underscores or dashes; RFC names map to the same codes.
_REASON_NAMES: dict[str, int] = {
    "unspecified": 0,
    "keycompromise": 1,
    "cacompromise": 2,
    "affiliationchange": 3,
    "affiliationchanged": 3,
    "superseded": 4,
    "cessationofoperation": 5,
    "certificatehold": 6,
    "privilegewithdrawn": 9,
    "aacompromise": 10,
}


class CaConfigurationError(ValueError):
    """The CA's certificate or key files are missing, unreadable or do not fit together."""


# -- secrets ---------------------------------------------------------------------------

# scrypt at N=2^14, r=8, p=1: ~16 MiB and tens of milliseconds per guess.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 14, 8, 1
_SCRYPT_LEN = 32
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def hash_secret(secret: str) -> str:
    """``scrypt$N$r$p$salt$hash`` of a user-chosen enrollment secret."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode(),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=_SCRYPT_LEN,
        maxmem=_SCRYPT_MAXMEM,
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        actual = hashlib.scrypt(
            secret.encode(),
            salt=salt,
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=_SCRYPT_MAXMEM,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


# a hash of nothing anyone knows, checked for unknown ids so they take as long as known ones
_DUMMY_HASH = hash_secret(secrets.token_urlsafe(16))


# -- CA material -----------------------------------------------------------------------


@dataclass(frozen=True)
class CaMaterial:
    """The CA's certificate, its private key (memory only) and its chain."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    #: the CA certificate first, the root last (just the CA itself for a root CA).
    chain: tuple[x509.Certificate, ...]

    @property
    def chain_pem(self) -> tuple[str, ...]:
        return tuple(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain)

    @property
    def subject_key_identifier(self) -> bytes:
        try:
            ext = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            return ext.value.digest
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.certificate.public_key()).digest

    @property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI extension of everything this CA signs (certificates and CRLs)."""
        return x509.AuthorityKeyIdentifier(
            key_identifier=self.subject_key_identifier,
            authority_cert_issuer=None,
            authority_cert_serial_number=None,
        )


def _resolve(path: Path, names: Sequence[str]) -> Path:
    """A file, or the first of ``names`` inside a directory (a mounted Secret)."""
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise CaConfigurationError(f"{path} is a directory without any of {', '.join(names)}")
    if not path.is_file():
        raise CaConfigurationError(f"{path} does not exist")
    return path


def _read_material(cert_path: Path, key_path: Path) -> CaMaterial:
    cert_file = _resolve(cert_path, ("tls.crt", "ca.crt", "ca-cert.pem", "cert.pem"))
    key_file = _resolve(key_path, ("tls.key", "ca.key", "ca-key.pem", "key.pem"))
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_file.read_bytes()))
    except ValueError as exc:
        raise CaConfigurationError(f"{cert_file}: not a PEM certificate ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # the message never includes the key's bytes
        raise CaConfigurationError(f"{key_file}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaConfigurationError(f"{key_file}: the CA key must be ECDSA P-256")
    certificate = chain[0]
    if certificate.public_key() != key.public_key():
        raise CaConfigurationError(f"{key_file} is not the key of the certificate in {cert_file}")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        is_ca = constraints.value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CaConfigurationError(f"{cert_file}: the certificate is not a CA (BasicConstraints)")
    return CaMaterial(certificate=certificate, private_key=key, chain=chain)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, _KEY_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file created with ``mode``, then rename it in place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def create_dev_ca(directory: Path, name: str) -> CaMaterial:
    """The development CA in ``directory`` (``ca-cert.pem``, ``ca-key.pem`` mode 0600),
    created on first use and reused afterwards; safe against concurrent starts."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / "ca-cert.pem", directory / "ca-key.pem"
    with _exclusive(directory / ".lock"):
        if cert_path.exists() and key_path.exists():
            return _read_material(cert_path, key_path)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ledgerlens"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = datetime.now(UTC).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=365 * DEV_CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # the key first: a certificate file on disk means both are complete
        _write_new(key_path, key_pem, _KEY_FILE_MODE)
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return CaMaterial(certificate=cert, private_key=key, chain=(cert,))


def load_ca_material(settings: Settings) -> CaMaterial:
    """The configured CA (both files set), or the dev CA under ``<data_dir>/ca/``."""
    cert_file, key_file = settings.ca_cert_file, settings.ca_key_file
    if cert_file and key_file:
        return _read_material(Path(cert_file), Path(key_file))
    if cert_file or key_file:
        raise CaConfigurationError(
            "set both LEDGERLENS_IDENTITY_CA_CERT_FILE and LEDGERLENS_IDENTITY_CA_KEY_FILE, "
            "or neither (for a development CA)"
        )
    return create_dev_ca(Path(settings.data_dir) / "ca", settings.ca_name)


# -- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeRequest:
    """Fabric CA's ``attr_reqs`` entry: a required (or optional) attribute by name."""

    name: str
    optional: bool = False


@dataclass(frozen=True)
class EnrollmentIdentity:
    enrollment_id: str
    role: Role
    affiliation: str
    attributes: tuple[Attribute, ...]
    max_enrollments: int | None
    revoked: bool


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_pem: str
    #: the CA chain, issuing CA first, root last.
    chain_pem: tuple[str, ...]
    #: lower-case hex.
    serial: str
    enrollment_id: str
    not_before: datetime
    not_after: datetime
    #: the attributes written into the certificate's extension (empty: no extension).
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RevokeResult:
    #: serials this call revoked (lower-case hex); already revoked ones are not repeated.
    revoked_serials: tuple[str, ...]
    revoked_at: datetime
    #: the CA's subject key identifier (the revoked certificates' AKI), lower-case hex.
    aki: str


@dataclass(frozen=True)
class Crl:
    der: bytes
    pem: str
    this_update: datetime
    next_update: datetime
    crl_number: int


@dataclass(frozen=True)
class CaInfo:
    ca_name: str
    #: the CA's chain, the CA first, root last.
    chain_pem: tuple[str, ...]


@dataclass(frozen=True)
class CertificateHolder:
    """Who presented a certificate of this CA (for Fabric token authorisation)."""

    enrollment_id: str
    role: str
    affiliation: str
    attributes: dict[str, str]
    serial: str


# -- validation helpers ----------------------------------------------------------------


def normalize_serial(serial: str, field_name: str = "serial") -> str:
    """Lower-case hex without leading zeros; accepts ``0x``, colons and upper case."""
    text = serial.strip().lower().replace(":", "")
    text = text.removeprefix("0x")
    try:
        value = int(text, 16)
    except ValueError:
        raise InvalidArgument(
            f"{field_name}: not a hexadecimal serial number",
            [(field_name, "must be a hexadecimal serial number")],
        ) from None
    if value <= 0:
        raise InvalidArgument(
            f"{field_name}: must be positive", [(field_name, "must be a positive serial number")]
        )
    return format(value, "x")


def parse_reason(reason: int | str | x509.ReasonFlags | None, field_name: str = "reason") -> int:
    """An RFC 5280 reason code from a code, a Fabric CA name or a ``ReasonFlags``."""
    if reason is None or reason == "":
        return 0
    if isinstance(reason, x509.ReasonFlags):
        for code, flag in _REASONS.items():
            if flag is reason:
                return code
    elif isinstance(reason, int):
        if reason in _REASONS:
            return reason
    else:
        key = re.sub(r"[^a-z0-9]", "", reason.lower())
        if key.isdigit() and int(key) in _REASONS:
            return int(key)
        if key in _REASON_NAMES:
            return _REASON_NAMES[key]
    raise InvalidArgument(
        f"{field_name}: unknown revocation reason {reason!r}",
        [(field_name, "must be an RFC 5280 reason, e.g. keycompromise or superseded")],
    )


def _check_enrollment_id(enrollment_id: str | None) -> str:
    if not enrollment_id:
        raise InvalidArgument("enrollment_id is required", [("enrollment_id", "must not be empty")])
    if len(enrollment_id) > MAX_ENROLLMENT_ID or _CONTROL.search(enrollment_id):
        raise InvalidArgument(
            "enrollment_id is invalid",
            [("enrollment_id", f"1-{MAX_ENROLLMENT_ID} printable characters")],
        )
    return enrollment_id


def _check_role(role: str | Role) -> Role:
    try:
        return Role(str(role).lower())
    except ValueError:
        raise InvalidArgument(
            f"role: unknown role {role!r}",
            [("role", "must be one of " + ", ".join(r.value for r in Role))],
        ) from None


def _check_affiliation(affiliation: str) -> str:
    if affiliation and (
        len(affiliation) > MAX_AFFILIATION
        or _CONTROL.search(affiliation)
        or any(not part for part in affiliation.split("."))
    ):
        raise InvalidArgument(
            "affiliation is invalid",
            [("affiliation", "dot-separated non-empty names, e.g. org1.department1")],
        )
    return affiliation


def _check_attributes(attrs: Sequence[Attribute], field_name: str = "attributes") -> None:
    if len(attrs) > MAX_ATTRIBUTES:
        raise InvalidArgument(
            f"{field_name}: at most {MAX_ATTRIBUTES}",
            [(field_name, f"at most {MAX_ATTRIBUTES} attributes")],
        )
    for i, attr in enumerate(attrs):
        if not attr.name or len(attr.name) > MAX_ATTRIBUTE_NAME or _CONTROL.search(attr.name):
            raise InvalidArgument(
                f"{field_name}[{i}].name is invalid",
                [(f"{field_name}[{i}].name", f"1-{MAX_ATTRIBUTE_NAME} printable characters")],
            )
        if len(attr.value) > MAX_ATTRIBUTE_VALUE:
            raise InvalidArgument(
                f"{field_name}[{i}].value is too long",
                [(f"{field_name}[{i}].value", f"at most {MAX_ATTRIBUTE_VALUE} characters")],
            )


def _parse_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if not data.strip():
        raise InvalidArgument("csr is required", [("csr", "must be a PEM PKCS#10 request")])
    if len(data) > MAX_CSR_BYTES:
        raise InvalidArgument("csr is too large", [("csr", f"at most {MAX_CSR_BYTES} bytes")])
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise InvalidArgument(
            "csr: not a PEM PKCS#10 certificate request",
            [("csr", "must be a PEM PKCS#10 request")],
        ) from None
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise InvalidArgument("csr: key must be ECDSA P-256", [("csr", "key must be ECDSA P-256")])
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise InvalidArgument(
            "csr: signature does not verify", [("csr", "the request's signature is invalid")]
        )
    return csr


def _attrs_json(values: dict[str, str]) -> bytes:
    # sorted, compact: the same bytes Fabric CA writes for the same attributes
    return json.dumps({"attrs": values}, sort_keys=True, separators=(",", ":")).encode()


def _to_identity(record: IdentityRecord) -> EnrollmentIdentity:
    return EnrollmentIdentity(
        enrollment_id=record.enrollment_id,
        role=Role(record.role),
        affiliation=record.affiliation,
        attributes=record.attrs,
        max_enrollments=record.max_enrollments,
        revoked=record.revoked_at is not None,
    )


# -- the CA ----------------------------------------------------------------------------


class CertificateAuthority:
    """Registration, enrollment, revocation and CRLs of one CA."""

    def __init__(
        self,
        material: CaMaterial,
        store: CaStore,
        *,
        ca_name: str,
        certificate_days: int = 365,
        crl_validity: timedelta = DEFAULT_CRL_VALIDITY,
    ) -> None:
        self._material = material
        self._store = store
        self.ca_name = ca_name
        self._certificate_days = certificate_days
        self._crl_validity = crl_validity
        self._aki_hex = material.subject_key_identifier.hex()

    @classmethod
    def from_settings(cls, settings: Settings, store: CaStore) -> CertificateAuthority:
        return cls(
            load_ca_material(settings),
            store,
            ca_name=settings.ca_name,
            certificate_days=settings.certificate_days,
        )

    @property
    def certificate(self) -> x509.Certificate:
        return self._material.certificate

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The CA's public key (what certificates and CRLs verify against)."""
        return self._material.private_key.public_key()

    def ca_info(self) -> CaInfo:
        return CaInfo(ca_name=self.ca_name, chain_pem=self._material.chain_pem)

    # -- registration ------------------------------------------------------------------

    async def register(
        self,
        enrollment_id: str,
        secret: str | None,
        *,
        role: str | Role = Role.CLIENT,
        affiliation: str = "",
        attributes: Sequence[Attribute] = (),
        max_enrollments: int | None = None,
    ) -> EnrollmentIdentity:
        """Register an identity; ``secret`` None: it can enroll only when already
        authenticated (``enroll(..., secret=None)``). ALREADY_EXISTS if taken."""
        enrollment_id = _check_enrollment_id(enrollment_id)
        checked_role = _check_role(role)
        affiliation = _check_affiliation(affiliation)
        _check_attributes(attributes)
        if secret is not None and not secret:
            raise InvalidArgument("secret must not be empty", [("secret", "must not be empty")])
        if max_enrollments is not None and max_enrollments < 1:
            raise InvalidArgument(
                "max_enrollments must be positive (None: unlimited)",
                [("max_enrollments", "a positive number, or unset for unlimited")],
            )
        secret_hash = None if secret is None else await asyncio.to_thread(hash_secret, secret)
        record = await self._store.add_identity(
            enrollment_id=enrollment_id,
            secret_hash=secret_hash,
            role=checked_role.value,
            affiliation=affiliation,
            attrs=list(attributes),
            max_enrollments=max_enrollments,
            now=datetime.now(UTC),
        )
        return _to_identity(record)

    async def get_identity(self, enrollment_id: str) -> EnrollmentIdentity | None:
        record = await self._store.get_identity(enrollment_id)
        return None if record is None else _to_identity(record)

    async def authenticate(self, enrollment_id: str, secret: str) -> EnrollmentIdentity:
        """The identity if ``secret`` is its secret; UNAUTHENTICATED otherwise (one message
        for an unknown id and a wrong secret)."""
        record = await self._store.get_identity(enrollment_id) if enrollment_id else None
        stored = record.secret_hash if record is not None else None
        ok = await asyncio.to_thread(verify_secret, secret, stored or _DUMMY_HASH)
        if record is None or stored is None or not ok:
            raise Unauthenticated(
                "enrollment id or secret is wrong", reason="BAD_ENROLLMENT_CREDENTIALS"
            )
        return _to_identity(record)

    # -- enrollment --------------------------------------------------------------------

    async def enroll(
        self,
        enrollment_id: str,
        secret: str | None,
        csr_pem: str | bytes,
        *,
        profile: str = "",
        attr_reqs: Sequence[AttributeRequest] | None = None,
        role: str | Role | None = None,
        affiliation: str | None = None,
        attributes: Sequence[Attribute] | None = None,
    ) -> IssuedCertificate:
        """Issue a certificate for ``csr_pem`` to ``enrollment_id``.

        With a ``secret`` the identity must be registered with that secret, and its
        registration decides role, affiliation and attributes. ``secret=None`` is for a
        caller already authenticated otherwise (a token with ``certs:enroll``): a
        registered identity's values are used unless ``role`` / ``affiliation`` /
        ``attributes`` are given; an unregistered id is enrolled with those values.

        ``attr_reqs`` None puts every ``ecert`` attribute into the certificate; a list
        puts ``hf.EnrollmentID``, ``hf.Type``, ``hf.Affiliation`` and the requested ones
        (a missing non-optional one is INVALID_ARGUMENT).
        """
        enrollment_id = _check_enrollment_id(enrollment_id)
        if profile not in PROFILES:
            raise InvalidArgument(
                f"profile: unknown profile {profile!r}",
                [("profile", "empty (enrollment certificate) or 'tls'")],
            )
        if attributes is not None:
            _check_attributes(attributes)
        if affiliation is not None:
            _check_affiliation(affiliation)
        checked_role = None if role is None else _check_role(role)
        if attr_reqs is not None:
            for i, req in enumerate(attr_reqs):
                if not req.name:
                    raise InvalidArgument(
                        f"attr_reqs[{i}].name is required",
                        [(f"attr_reqs[{i}].name", "must not be empty")],
                    )
        csr = _parse_csr(csr_pem)

        identity: EnrollmentIdentity | None
        if secret is not None:
            identity = await self.authenticate(enrollment_id, secret)
        else:
            identity = await self.get_identity(enrollment_id)
        if identity is not None and identity.revoked:
            raise PermissionDenied(
                f"enrollment id {enrollment_id!r} is revoked", reason="IDENTITY_REVOKED"
            )

        if identity is not None:
            eff_role = checked_role or identity.role
            eff_affiliation = identity.affiliation if affiliation is None else affiliation
            registered = identity.attributes if attributes is None else tuple(attributes)
        else:
            eff_role = checked_role or Role.CLIENT
            eff_affiliation = affiliation or ""
            registered = tuple(attributes or ())

        cert_attrs = self._select_attributes(
            enrollment_id,
            eff_role,
            eff_affiliation,
            registered,
            attr_reqs,
            explicit=attributes is not None,
        )

        if identity is not None and not await self._store.count_enrollment(enrollment_id):
            raise PermissionDenied(
                f"enrollment id {enrollment_id!r} has no enrollments left",
                reason="MAX_ENROLLMENTS_REACHED",
            )
        return await self._issue(
            csr, enrollment_id, eff_role, eff_affiliation, cert_attrs, profile=profile
        )

    @staticmethod
    def _select_attributes(
        enrollment_id: str,
        role: Role,
        affiliation: str,
        registered: Sequence[Attribute],
        attr_reqs: Sequence[AttributeRequest] | None,
        *,
        explicit: bool,
    ) -> dict[str, str]:
        defaults = {
            "hf.EnrollmentID": enrollment_id,
            "hf.Type": role.value,
            "hf.Affiliation": affiliation,
        }
        available = dict(defaults)
        available.update({a.name: a.value for a in registered})
        if attr_reqs is None:
            chosen = dict(defaults)
            # attributes passed explicitly by a trusted caller are all wanted
            chosen.update({a.name: a.value for a in registered if a.ecert or explicit})
            return chosen
        chosen = dict(defaults)
        for i, req in enumerate(attr_reqs):
            if req.name in available:
                chosen[req.name] = available[req.name]
            elif not req.optional:
                raise InvalidArgument(
                    f"attr_reqs: identity {enrollment_id!r} has no attribute {req.name!r}",
                    [(f"attr_reqs[{i}].name", f"{req.name!r} is not an attribute of the identity")],
                )
        return chosen

    async def _issue(
        self,
        csr: x509.CertificateSigningRequest,
        enrollment_id: str,
        role: Role,
        affiliation: str,
        attrs: dict[str, str],
        *,
        profile: str,
    ) -> IssuedCertificate:
        ca = self._material
        public_key = csr.public_key()
        names = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value)]
        names += [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, part)
            for part in affiliation.split(".")
            if part
        ]
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, enrollment_id))
        subject = x509.Name([x509.RelativeDistinguishedName([n]) for n in names])

        now = datetime.now(UTC).replace(microsecond=0)
        not_before = now - BACKDATE
        # never outlive the CA (a verifier would reject the tail anyway)
        not_after = min(
            now + timedelta(days=self._certificate_days), ca.certificate.not_valid_after_utc
        )
        tls = profile == "tls"
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=tls,
                    data_encipherment=False,
                    key_agreement=tls,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                ca.authority_key_identifier,
                critical=False,
            )
        )
        if tls:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            # Fabric CA copies the request's hosts into the certificate
            builder = builder.add_extension(san.value, critical=False)
        except x509.ExtensionNotFound:
            pass
        if attrs and not tls:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(ATTRIBUTES_OID, _attrs_json(attrs)), critical=False
            )
        certificate = builder.sign(ca.private_key, hashes.SHA256())
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        serial_hex = format(serial, "x")
        await self._store.add_certificate(
            serial=serial_hex,
            enrollment_id=enrollment_id,
            role=role.value,
            affiliation=affiliation,
            attrs=attrs if not tls else {},
            aki=self._aki_hex,
            not_before=not_before,
            not_after=not_after,
            pem=pem,
        )
        return IssuedCertificate(
            certificate_pem=pem,
            chain_pem=ca.chain_pem,
            serial=serial_hex,
            enrollment_id=enrollment_id,
            not_before=not_before,
            not_after=not_after,
            attributes=attrs if not tls else {},
        )

    # -- revocation ----------------------------------------------------------------------

    async def revoke(
        self,
        *,
        serial: str | None = None,
        enrollment_id: str | None = None,
        reason: int | str | x509.ReasonFlags | None = 0,
        aki: str | None = None,
        revoke_identity: bool = False,
    ) -> RevokeResult:
        """Revoke one certificate (``serial``, optionally with the ``aki`` it must carry) or
        every certificate of ``enrollment_id``. ``revoke_identity`` also stops the identity
        from enrolling again (what Fabric CA does when revoking by id). NOT_FOUND when
        nothing matches; already revoked certificates are not listed again."""
        code = parse_reason(reason)
        if bool(serial) == bool(enrollment_id):
            raise InvalidArgument(
                "give either serial or enrollment_id",
                [("serial", "exactly one of serial and enrollment_id is required")],
            )
        now = datetime.now(UTC).replace(microsecond=0)
        if serial:
            wanted = normalize_serial(serial)
            record = await self._store.get_certificate(wanted)
            if aki is not None and aki.strip():
                aki_hex = aki.strip().lower().replace(":", "")
                if record is not None and record.aki != aki_hex:
                    record = None
            if record is None:
                raise NotFound(
                    f"no certificate with serial {wanted} issued by this CA",
                    resource_type="certificate",
                    resource_name=wanted,
                )
            targets = [record.serial]
        else:
            assert enrollment_id is not None
            records = await self._store.certificates_of(enrollment_id)
            identity = await self._store.get_identity(enrollment_id)
            if not records and identity is None:
                raise NotFound(
                    f"no certificates or identity for enrollment id {enrollment_id!r}",
                    resource_type="enrollment_identity",
                    resource_name=enrollment_id,
                )
            if revoke_identity and identity is not None:
                await self._store.mark_identity_revoked(enrollment_id, now)
            targets = [r.serial for r in records]
        revoked = await self._store.revoke(serials=targets, reason=code, when=now)
        return RevokeResult(revoked_serials=tuple(revoked), revoked_at=now, aki=self._aki_hex)

    async def issued(self, serial: str) -> IssuedRecord | None:
        """The record of a certificate this CA issued (None if unknown)."""
        return await self._store.get_certificate(normalize_serial(serial))

    async def crl(self) -> Crl:
        """A freshly signed CRL of every revoked certificate (with date and reason)."""
        ca = self._material
        number = await self._store.next_crl_number()
        now = datetime.now(UTC).replace(microsecond=0)
        next_update = now + self._crl_validity
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.certificate.subject)
            .last_update(now)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                ca.authority_key_identifier,
                critical=False,
            )
        )
        for record in await self._store.revoked():
            assert record.revoked_at is not None
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(record.serial, 16))
                .revocation_date(record.revoked_at)
            )
            code = record.revocation_reason or 0
            if code:  # RFC 5280 5.3.1: leave the reason out rather than say "unspecified"
                entry = entry.add_extension(x509.CRLReason(_REASONS[code]), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(ca.private_key, hashes.SHA256())
        return Crl(
            der=crl.public_bytes(serialization.Encoding.DER),
            pem=crl.public_bytes(serialization.Encoding.PEM).decode(),
            this_update=now,
            next_update=next_update,
            crl_number=number,
        )

    # -- certificate-based callers (Fabric CA tokens) ------------------------------------

    async def holder_of(self, certificate: x509.Certificate) -> CertificateHolder:
        """Who ``certificate`` belongs to, if this CA issued it and it is still good.

        UNAUTHENTICATED when it was not issued by this CA (signature and record), is
        outside its validity, is revoked, or its identity is revoked.
        """
        try:
            certificate.verify_directly_issued_by(self._material.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise Unauthenticated(
                "certificate was not issued by this CA", reason="UNTRUSTED_CERTIFICATE"
            ) from None
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise Unauthenticated("certificate has expired", reason="CERTIFICATE_EXPIRED")
        record = await self._store.get_certificate(format(certificate.serial_number, "x"))
        if record is None:
            raise Unauthenticated(
                "certificate is unknown to this CA", reason="UNTRUSTED_CERTIFICATE"
            )
        if record.revoked_at is not None:
            raise Unauthenticated("certificate is revoked", reason="CERTIFICATE_REVOKED")
        identity = await self._store.get_identity(record.enrollment_id)
        if identity is not None and identity.revoked_at is not None:
            raise Unauthenticated("identity is revoked", reason="IDENTITY_REVOKED")
        if identity is not None:
            attributes = {a.name: a.value for a in identity.attrs}
            role, affiliation = identity.role, identity.affiliation
        else:
            attributes, role, affiliation = dict(record.attrs), record.role, record.affiliation
        return CertificateHolder(
            enrollment_id=record.enrollment_id,
            role=role,
            affiliation=affiliation,
            attributes=attributes,
            serial=record.serial,
        )

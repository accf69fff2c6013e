"""The ledger's Fabric identity, enrolled with the identity service's CA.

:func:`enroll_identity` generates an ECDSA P-256 key here, sends only its CSR (subject
CN = the enrollment id) to identity's ``EnrollCertificate`` with a bearer token that
has the ``certs:enroll`` scope, and writes what the Fabric backend reads::

    DIR/key.pem        the private key, PKCS#8 PEM, mode 0600 (never leaves this machine)
    DIR/cert.pem       the enrolled certificate
    DIR/ca-chain.pem   the CA chain, issuing CA first, root last (the MSP's cacerts)

``python -m ledgerlens.services.ledger enroll`` is the command line of it. Every failure
is an :class:`EnrollError` whose message is one line for a person.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.clients import RetryPolicy, identity_client
from ledgerlens.runtime.errors import InvalidArgument, from_rpc_error

if TYPE_CHECKING:
    from ledgerlens.identity.v1.identity_pb2_grpc import IdentityServiceAsyncStub

__all__ = [
    "CERTIFICATE_FILE",
    "CHAIN_FILE",
    "ENROLL_SCOPE",
    "KEY_FILE",
    "EnrollError",
    "EnrolledIdentity",
    "enroll_identity",
]

ENROLL_SCOPE = "certs:enroll"
CERTIFICATE_FILE = "cert.pem"
KEY_FILE = "key.pem"
CHAIN_FILE = "ca-chain.pem"
#: the env prefix of the Fabric backend's settings (``Settings.fabric``).
FABRIC_ENV_PREFIX = "LEDGERLENS_LEDGER_FABRIC__"
#: a person (or a Job) waits: a few quick retries of a refused connection, no more.
_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0)


class EnrollError(Exception):
    """Enrollment failed; ``str()`` is one line for a person (never a secret)."""


@dataclass(frozen=True)
class EnrolledIdentity:
    """What :func:`enroll_identity` wrote, and what the certificate says."""

    msp_id: str
    enrollment_id: str
    certificate_path: Path
    private_key_path: Path
    ca_chain_path: Path
    serial: str
    not_after: datetime

    def fabric_env(self) -> dict[str, str]:
        """The Fabric backend's settings that point it at these files."""
        return {
            f"{FABRIC_ENV_PREFIX}MSP_ID": self.msp_id,
            f"{FABRIC_ENV_PREFIX}CERTIFICATE_PATH": str(self.certificate_path),
            f"{FABRIC_ENV_PREFIX}PRIVATE_KEY_PATH": str(self.private_key_path),
        }

    def env_lines(self) -> list[str]:
        """``NAME=value`` lines (shell-quoted only where needed) for an env file."""
        return [f"{name}={shlex.quote(value)}" for name, value in self.fabric_env().items()]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_error(error: grpc.aio.AioRpcError, target: str) -> str:
    """One line for a failed ``EnrollCertificate`` call."""
    code = error.code()
    details = _one_line(error.details() or "")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"identity at {target} did not answer in time (DEADLINE_EXCEEDED: {details})"
    domain = from_rpc_error(error)
    if code == grpc.StatusCode.UNAVAILABLE and (domain is None or domain.reason == code.name):
        return f"cannot reach identity at {target} (UNAVAILABLE: {details})"
    message = _one_line(domain.message) if domain is not None else details
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"identity refused the token (UNAUTHENTICATED: {message}); "
            f"enrolling needs a valid token with scope {ENROLL_SCOPE!r}"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        if domain is not None and domain.reason == "SCOPE_MISSING":
            return (
                f"PERMISSION_DENIED: the token lacks scope {ENROLL_SCOPE!r}, which "
                f"EnrollCertificate needs (identity said: {message})"
            )
        return f"PERMISSION_DENIED: {message}"
    line = f"{code.name}: {message}" if message else code.name
    if isinstance(domain, InvalidArgument) and domain.violations:
        line += " (" + "; ".join(f"{f}: {_one_line(d)}" for f, d in domain.violations) + ")"
    return line


def _csr(key: ec.EllipticCurvePrivateKey, enrollment_id: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, enrollment_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _check_issued(
    key: ec.EllipticCurvePrivateKey, certificate_pem: str, chain: Sequence[str]
) -> x509.Certificate:
    """The certificate is for our key and its chain's first certificate issued it: a
    misconfigured (or impersonated) CA must not leave an unusable identity behind."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
        cas = [x509.load_pem_x509_certificate(pem.encode()) for pem in chain]
    except ValueError as exc:
        raise EnrollError(f"identity returned a malformed certificate: {exc}") from exc
    if certificate.public_key() != key.public_key():
        raise EnrollError("identity returned a certificate for another key than the CSR's")
    if cas:
        try:
            certificate.verify_directly_issued_by(cas[0])
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise EnrollError(
                f"the returned CA chain does not verify the certificate: {exc or 'bad signature'}"
            ) from exc
    return certificate


def _write_new(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``path`` atomically (a temporary file in the same directory, then renamed)
    with ``mode`` from the start; without ``replace`` an existing file is never touched."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic and never overwrites (FileExistsError)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _pem_text(pems: Sequence[str]) -> bytes:
    return "".join(pem if pem.endswith("\n") else pem + "\n" for pem in pems).encode()


def _refuse_existing_key(out_dir: Path, force: bool) -> Path:
    """``out_dir`` made absolute; :class:`EnrollError` when it holds a key and not ``force``."""
    out = out_dir.absolute()
    key_path = out / KEY_FILE
    if key_path.exists() and not force:
        raise EnrollError(f"{key_path} exists (pass --force to replace the key)")
    return out


def _write_identity(
    out: Path, key_pem: bytes, certificate_pem: str, chain: Sequence[str], *, force: bool
) -> None:
    key_path = out / KEY_FILE
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the key first: if another enrollment raced us to it, no certificate of ours
        # replaces the one that matches its key
        _write_new(key_path, key_pem, 0o600, replace=force)
        _write_new(out / CERTIFICATE_FILE, _pem_text([certificate_pem]), 0o644, replace=True)
        _write_new(out / CHAIN_FILE, _pem_text(chain), 0o644, replace=True)
    except FileExistsError:
        raise EnrollError(f"{key_path} exists (pass --force to replace the key)") from None
    except OSError as exc:
        raise EnrollError(f"cannot write the identity under {out}: {exc.strerror or exc}") from None


async def _call(
    stub: IdentityServiceAsyncStub,
    request: identity_pb2.EnrollCertificateRequest,
    metadata: Sequence[tuple[str, str]],
    call_timeout: float,
    target: str,
) -> tuple[identity_pb2.EnrollCertificateResponse, list[str]]:
    try:
        enrolled: identity_pb2.EnrollCertificateResponse = await stub.EnrollCertificate(
            request, metadata=metadata, timeout=call_timeout
        )
        chain = list(enrolled.chain_pem)
        if not chain:  # the chain is public: GetCaInfo has it when the response had none
            info = await stub.GetCaInfo(identity_pb2.GetCaInfoRequest(), timeout=call_timeout)
            chain = list(info.chain_pem)
    except grpc.aio.AioRpcError as exc:
        raise EnrollError(describe_error(exc, target)) from exc
    return enrolled, chain


async def enroll_identity(
    channel_or_target: grpc.aio.Channel | str,
    token: str,
    enrollment_id: str,
    msp_id: str,
    out_dir: str | Path,
    *,
    profile: str = "",
    force: bool = False,
    call_timeout: float = 10.0,
) -> EnrolledIdentity:
    """Enroll a new P-256 key as ``enrollment_id``; write ``out_dir/{key,cert,ca-chain}.pem``.

    ``channel_or_target`` is a channel to identity (the caller keeps it) or its
    ``host:port`` (plaintext; a channel of our own, closed here). ``token`` is a bearer
    token with ``certs:enroll``. An existing ``key.pem`` is kept (:class:`EnrollError`)
    unless ``force``. Nothing is written unless identity issued a certificate for the
    key, signed by the first certificate of the chain it returned.
    """
    if not msp_id.strip():
        raise EnrollError("the MSP id is required (e.g. Org1MSP)")
    if not 1 <= len(enrollment_id) <= 64:
        raise EnrollError("the enrollment id must be 1-64 characters (it is the certificate's CN)")
    if not token:
        raise EnrollError(f"no token: enrolling needs a bearer token with scope {ENROLL_SCOPE!r}")
    out = await asyncio.to_thread(_refuse_existing_key, Path(out_dir), force)

    # Only the CSR (the public key) leaves this machine.
    key = ec.generate_private_key(ec.SECP256R1())
    request = identity_pb2.EnrollCertificateRequest(
        enrollment_id=enrollment_id, csr_pem=_csr(key, enrollment_id), profile=profile
    )
    metadata = (("authorization", f"Bearer {token}"),)
    if isinstance(channel_or_target, str):
        target = channel_or_target
        async with identity_client(target, retry=_RETRY, default_timeout=call_timeout) as client:
            enrolled, chain = await _call(client.stub, request, metadata, call_timeout, target)
    else:
        target = "the given channel"
        stub = identity_pb2_grpc.IdentityServiceStub(channel_or_target)
        enrolled, chain = await _call(stub, request, metadata, call_timeout, target)
    certificate = _check_issued(key, enrolled.certificate_pem, chain)

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    await asyncio.to_thread(
        _write_identity, out, key_pem, enrolled.certificate_pem, chain, force=force
    )
    return EnrolledIdentity(
        msp_id=msp_id,
        enrollment_id=enrollment_id,
        certificate_path=out / CERTIFICATE_FILE,
        private_key_path=out / KEY_FILE,
        ca_chain_path=out / CHAIN_FILE,
        serial=enrolled.serial,
        not_after=certificate.not_valid_after_utc.astimezone(UTC),
    )

"""The certificate authority on SQLite and PostgreSQL: enrollment, CSR checks,
revocation and CRLs, and where the CA's key does (not) live."""

from __future__ import annotations

import base64
import json
import stat
from datetime import timedelta
from pathlib import Path

import _ca_fixtures as fx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ledgerlens.runtime.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from ledgerlens.services.identity.ca import (
    ATTRIBUTES_OID,
    Attribute,
    AttributeRequest,
    CaConfigurationError,
    CertificateAuthority,
    Role,
    load_ca_material,
)
from ledgerlens.services.identity.ca_store import CaStore
from ledgerlens.services.identity.settings import Settings

pytestmark = pytest.mark.integration


def _violation_fields(exc: InvalidArgument) -> set[str]:
    return {f for f, _ in exc.violations}


def _attrs_of(cert: x509.Certificate) -> dict[str, str]:
    ext = cert.extensions.get_extension_for_oid(ATTRIBUTES_OID)
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    return dict(json.loads(ext.value.value)["attrs"])


async def test_valid_csr_enrolls_into_a_fabric_identity(ca: CertificateAuthority) -> None:
    await ca.register(
        "user1",
        "s3cret-pw",
        role=Role.CLIENT,
        affiliation="org1.department1",
        attributes=[Attribute("app.team", "audit"), Attribute("app.other", "x")],
    )
    key, csr = fx.make_csr(cn="someone-else")
    issued = await ca.enroll("user1", "s3cret-pw", csr, attr_reqs=[AttributeRequest("app.team")])
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())

    cert.verify_directly_issued_by(ca.certificate)  # raises if not
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "user1"
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert ous == ["client", "org1", "department1"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is False
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.value.digest
    assert _attrs_of(cert) == {
        "hf.EnrollmentID": "user1",
        "hf.Type": "client",
        "hf.Affiliation": "org1.department1",
        "app.team": "audit",
    }
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(
        days=fx.CERTIFICATE_DAYS, minutes=1
    )
    assert issued.serial == format(cert.serial_number, "x")
    assert issued.chain_pem == (ca.certificate.public_bytes(serialization.Encoding.PEM).decode(),)
    record = await ca.issued(issued.serial)
    assert record is not None
    assert record.pem == issued.certificate_pem
    assert record.enrollment_id == "user1"
    assert record.revoked_at is None


async def test_attribute_requests_follow_fabric_rules(ca: CertificateAuthority) -> None:
    await ca.register(
        "peer0",
        "pw",
        role="peer",
        attributes=[Attribute("app.auto", "1", ecert=True), Attribute("app.asked", "2")],
    )
    # no attr_reqs: the ecert attributes only
    issued = await ca.enroll("peer0", "pw", fx.make_csr()[1])
    attrs = _attrs_of(x509.load_pem_x509_certificate(issued.certificate_pem.encode()))
    assert attrs["app.auto"] == "1"
    assert "app.asked" not in attrs
    assert attrs["hf.Type"] == "peer"
    # a missing optional attribute is skipped; a missing required one is refused
    issued = await ca.enroll(
        "peer0", "pw", fx.make_csr()[1], attr_reqs=[AttributeRequest("nope", optional=True)]
    )
    assert "nope" not in issued.attributes
    with pytest.raises(InvalidArgument) as err:
        await ca.enroll("peer0", "pw", fx.make_csr()[1], attr_reqs=[AttributeRequest("nope")])
    assert _violation_fields(err.value) == {"attr_reqs[0].name"}


async def test_csr_with_tampered_signature_is_invalid_argument(
    ca: CertificateAuthority, ca_store: CaStore
) -> None:
    await ca.register("user2", "pw")
    _, pem = fx.make_csr()
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature's s
    tampered = x509.load_der_x509_csr(bytes(der))  # still well-formed DER
    assert not tampered.is_signature_valid
    tampered_pem = tampered.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(InvalidArgument) as err:
        await ca.enroll("user2", "pw", tampered_pem)
    assert _violation_fields(err.value) == {"csr"}
    assert "signature" in err.value.message
    assert await ca_store.certificates_of("user2") == []


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa-2048", "p-384"],
)
async def test_csr_with_wrong_key_type_is_invalid_argument(
    ca: CertificateAuthority, make_key: object
) -> None:
    await ca.register("user3", "pw")
    _, pem = fx.make_csr(key=make_key())  # type: ignore[operator]
    with pytest.raises(InvalidArgument) as err:
        await ca.enroll("user3", "pw", pem)
    assert err.value.message == "csr: key must be ECDSA P-256"
    assert _violation_fields(err.value) == {"csr"}


async def test_missing_enrollment_id_and_garbage_csr_are_invalid_argument(
    ca: CertificateAuthority,
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await ca.enroll("", None, fx.make_csr()[1])
    assert _violation_fields(err.value) == {"enrollment_id"}
    await ca.register("user4", "pw")
    with pytest.raises(InvalidArgument) as err:
        await ca.enroll("user4", "pw", "-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
    assert _violation_fields(err.value) == {"csr"}
    with pytest.raises(InvalidArgument) as err:
        await ca.enroll("user4", "pw", fx.make_csr()[1], profile="bogus")
    assert _violation_fields(err.value) == {"profile"}


async def test_wrong_secret_unknown_id_and_limits(ca: CertificateAuthority) -> None:
    await ca.register("once", "right", max_enrollments=1)
    with pytest.raises(Unauthenticated):
        await ca.enroll("once", "wrong", fx.make_csr()[1])
    with pytest.raises(Unauthenticated):
        await ca.enroll("ghost", "right", fx.make_csr()[1])
    await ca.enroll("once", "right", fx.make_csr()[1])
    with pytest.raises(PermissionDenied):
        await ca.enroll("once", "right", fx.make_csr()[1])
    with pytest.raises(AlreadyExists):
        await ca.register("once", "again")


async def test_token_authenticated_enroll_uses_the_given_role(ca: CertificateAuthority) -> None:
    issued = await ca.enroll(
        "orderer0",
        None,
        fx.make_csr(hosts=("orderer0.example.com",))[1],
        role="orderer",
        affiliation="org2",
        attributes=[Attribute("app.zone", "eu")],
    )
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    assert ous == ["orderer", "org2"]
    assert _attrs_of(cert)["app.zone"] == "eu"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["orderer0.example.com"]


async def test_tls_profile_issues_a_tls_certificate(ca: CertificateAuthority) -> None:
    issued = await ca.enroll("peer1", None, fx.make_csr()[1], profile="tls", role="peer")
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


async def test_revoked_serial_appears_in_a_crl_signed_by_the_ca(ca: CertificateAuthority) -> None:
    await ca.register("user5", "pw")
    keep = await ca.enroll("user5", "pw", fx.make_csr()[1])
    gone = await ca.enroll("user5", "pw", fx.make_csr()[1])
    first = await ca.crl()
    assert (
        x509.load_der_x509_crl(first.der).get_revoked_certificate_by_serial_number(
            int(gone.serial, 16)
        )
        is None
    )

    result = await ca.revoke(serial=gone.serial.upper(), reason="keycompromise")
    assert result.revoked_serials == (gone.serial,)
    again = await ca.revoke(serial=gone.serial, reason=1)
    assert again.revoked_serials == ()

    crl_info = await ca.crl()
    crl = x509.load_pem_x509_crl(crl_info.pem.encode())
    assert crl.is_signature_valid(ca.public_key)
    assert x509.load_der_x509_crl(crl_info.der) == crl
    entry = crl.get_revoked_certificate_by_serial_number(int(gone.serial, 16))
    assert entry is not None
    assert entry.revocation_date_utc == result.revoked_at
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(int(keep.serial, 16)) is None
    assert crl_info.crl_number > first.crl_number
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == (
        crl_info.crl_number
    )


async def test_revoke_by_enrollment_id_revokes_all_its_certificates(
    ca: CertificateAuthority,
) -> None:
    await ca.register("user6", "pw")
    serials = {(await ca.enroll("user6", "pw", fx.make_csr()[1])).serial for _ in range(2)}
    result = await ca.revoke(enrollment_id="user6", reason="superseded", revoke_identity=True)
    assert set(result.revoked_serials) == serials
    crl = x509.load_der_x509_crl((await ca.crl()).der)
    assert {format(r.serial_number, "x") for r in crl} >= serials
    with pytest.raises(PermissionDenied):  # the identity itself is revoked now
        await ca.enroll("user6", "pw", fx.make_csr()[1])
    with pytest.raises(NotFound):
        await ca.revoke(serial="abcdef0123")
    with pytest.raises(NotFound):
        await ca.revoke(enrollment_id="nobody")
    with pytest.raises(InvalidArgument) as err:
        await ca.revoke(serial="xyz")
    assert _violation_fields(err.value) == {"serial"}
    with pytest.raises(InvalidArgument) as err:
        await ca.revoke(serial=next(iter(serials)), reason="because")
    assert _violation_fields(err.value) == {"reason"}


async def test_ca_key_and_secrets_never_reach_the_database(
    ca: CertificateAuthority, ca_engine: object, ca_dir: Path
) -> None:
    await ca.register("user7", "very-secret-value", role="admin")
    await ca.enroll("user7", "very-secret-value", fx.make_csr()[1])
    await ca.revoke(enrollment_id="user7")
    await ca.crl()
    dump = await fx.dump_tables(ca_engine)
    assert "user7" in dump  # the dump does see the data
    key_pem = (ca_dir / "ca-key.pem").read_text()
    body_lines = [ln for ln in key_pem.splitlines() if ln and not ln.startswith("-----")]
    assert body_lines
    assert all(line not in dump for line in body_lines)
    key_der = serialization.load_pem_private_key(key_pem.encode(), None).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert base64.b64encode(key_der).decode()[:40] not in dump.replace("\\n", "")
    assert "very-secret-value" not in dump


def test_dev_ca_is_created_once_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path), ca_name="dev-ca")
    first = load_ca_material(settings)
    key_file = tmp_path / "ca" / "ca-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = load_ca_material(settings)
    assert second.certificate == first.certificate
    assert second.private_key.private_numbers() == first.private_key.private_numbers()
    assert first.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert first.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "dev-ca"
    )


def test_ca_material_from_files_and_secret_mounts(tmp_path: Path) -> None:
    dev = load_ca_material(Settings(data_dir=str(tmp_path / "dev")))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "tls.crt").write_bytes(dev.certificate.public_bytes(serialization.Encoding.PEM))
    (secret / "tls.key").write_bytes((tmp_path / "dev" / "ca" / "ca-key.pem").read_bytes())
    mounted = load_ca_material(
        Settings(data_dir=str(tmp_path / "x"), ca_cert_file=str(secret), ca_key_file=str(secret))
    )
    assert mounted.certificate == dev.certificate
    assert not (tmp_path / "x" / "ca").exists()  # no dev CA when files are configured

    other = ec.generate_private_key(ec.SECP256R1())
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CaConfigurationError, match="not the key"):
        load_ca_material(Settings(ca_cert_file=str(secret / "tls.crt"), ca_key_file=str(wrong)))
    with pytest.raises(CaConfigurationError, match="both"):
        load_ca_material(Settings(ca_cert_file=str(secret / "tls.crt")))

"""The Fabric CA REST subset over a real socket (uvicorn on port 0, httpx), on SQLite
and PostgreSQL: Basic-auth enroll, token-authorised revoke and gencrl."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import _ca_fixtures as fx
import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from fastapi import FastAPI

from ledgerlens.runtime.ops import serve_ops_app
from ledgerlens.services.identity.ca import ATTRIBUTES_OID, Attribute, CertificateAuthority
from ledgerlens.services.identity.fabric_ca import (
    P256_ORDER,
    build_fabric_ca_router,
    create_fabric_token,
    token_payload,
)

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def http(ca: CertificateAuthority) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(build_fabric_ca_router(ca))
    server = await serve_ops_app(app, "127.0.0.1", port=0)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", timeout=10
        ) as client:
            yield client
    finally:
        await server.stop()


def _basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


async def _enroll(
    http: httpx.AsyncClient, user: str, secret: str, **extra: Any
) -> tuple[ec.EllipticCurvePrivateKey, bytes, httpx.Response]:
    key, csr = fx.make_csr()
    body = {"certificate_request": csr, "profile": "", **extra}
    response = await http.post("/api/v1/enroll", json=body, headers=_basic(user, secret))
    cert_pem = b""
    if response.status_code == 200:
        cert_pem = base64.b64decode(response.json()["result"]["Cert"])
    return key, cert_pem, response


def _serial(cert_pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


async def _signed_post(
    http: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    cert_pem: bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    signed_body: bytes | None = None,
) -> httpx.Response:
    raw = json.dumps(body).encode()
    token = create_fabric_token(
        cert_pem, key, "POST", path, raw if signed_body is None else signed_body
    )
    return await http.post(
        path, content=raw, headers={"Authorization": token, "Content-Type": "application/json"}
    )


def _assert_error(response: httpx.Response, status: int, code: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["result"] is None
    assert body["messages"] == []
    assert body["errors"][0]["code"] == code
    assert body["errors"][0]["message"]


async def test_enroll_with_basic_auth(http: httpx.AsyncClient, ca: CertificateAuthority) -> None:
    await ca.register("user1", "pw1", affiliation="org1", attributes=[Attribute("a.b", "c")])
    key, cert_pem, response = await _enroll(
        http, "user1", "pw1", attr_reqs=[{"name": "a.b", "optional": False}]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["errors"] == []
    assert body["messages"] == []
    info = body["result"]["ServerInfo"]
    assert info["CAName"] == "test-ca"
    chain = x509.load_pem_x509_certificates(base64.b64decode(info["CAChain"]))
    assert chain == [ca.certificate]
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(chain[0])
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "user1"
    ext = cert.extensions.get_extension_for_oid(ATTRIBUTES_OID).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    attrs = json.loads(ext.value)
    assert attrs["attrs"]["a.b"] == "c"


async def test_enroll_refusals_use_the_fabric_envelope(
    http: httpx.AsyncClient, ca: CertificateAuthority
) -> None:
    await ca.register("user2", "pw2")
    _, _, response = await _enroll(http, "user2", "wrong")
    _assert_error(response, 401, 20)
    _, _, response = await _enroll(http, "nobody", "pw2")
    _assert_error(response, 401, 20)
    response = await http.post("/api/v1/enroll", json={"certificate_request": fx.make_csr()[1]})
    _assert_error(response, 401, 20)  # no credentials at all
    response = await http.post(
        "/api/v1/enroll",
        json={"certificate_request": "not a csr"},
        headers=_basic("user2", "pw2"),
    )
    _assert_error(response, 400, 31)
    _, _, response = await _enroll(http, "user2", "pw2", caname="another-ca")
    _assert_error(response, 404, 19)


async def test_admin_token_revokes_and_gencrl_lists_the_serial(
    http: httpx.AsyncClient, ca: CertificateAuthority
) -> None:
    await ca.register("admin", "adminpw", role="admin")
    await ca.register("user3", "pw3", affiliation="org1")
    admin_key, admin_pem, _ = await _enroll(http, "admin", "adminpw")
    _, user_pem, _ = await _enroll(http, "user3", "pw3")
    serial = _serial(user_pem)

    response = await _signed_post(
        http,
        "/api/v1/revoke",
        {"id": "", "serial": serial, "aki": "", "reason": "keycompromise"},
        admin_pem,
        admin_key,
    )
    assert response.status_code == 200, response.text
    revoked = response.json()["result"]["RevokedCerts"]
    assert [r["Serial"] for r in revoked] == [serial]

    response = await _signed_post(http, "/api/v1/gencrl", {}, admin_pem, admin_key)
    assert response.status_code == 200, response.text
    crl = x509.load_pem_x509_crl(base64.b64decode(response.json()["result"]["CRL"]))
    assert crl.is_signature_valid(ca.public_key)
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )


async def test_high_s_token_is_refused(http: httpx.AsyncClient, ca: CertificateAuthority) -> None:
    await ca.register("admin", "adminpw", role="admin")
    await ca.register("user4", "pw4")
    admin_key, admin_pem, _ = await _enroll(http, "admin", "adminpw")
    _, user_pem, _ = await _enroll(http, "user4", "pw4")
    raw = json.dumps({"serial": _serial(user_pem), "reason": "superseded"}).encode()
    b64cert, b64sig = create_fabric_token(
        admin_pem, admin_key, "POST", "/api/v1/revoke", raw
    ).split(".")
    r, s = decode_dss_signature(base64.b64decode(b64sig))
    high = encode_dss_signature(r, P256_ORDER - s)
    # the flipped signature is mathematically valid: only the low-S rule refuses it
    admin_key.public_key().verify(
        high, token_payload("POST", "/api/v1/revoke", raw, b64cert), ec.ECDSA(hashes.SHA256())
    )
    token = f"{b64cert}.{base64.b64encode(high).decode()}"
    response = await http.post("/api/v1/revoke", content=raw, headers={"Authorization": token})
    _assert_error(response, 401, 20)
    record = await ca.issued(_serial(user_pem))
    assert record is not None
    assert record.revoked_at is None


async def test_token_over_another_body_or_uri_is_refused(
    http: httpx.AsyncClient, ca: CertificateAuthority
) -> None:
    await ca.register("admin", "adminpw", role="admin")
    await ca.register("user5", "pw5")
    admin_key, admin_pem, _ = await _enroll(http, "admin", "adminpw")
    _, user_pem, _ = await _enroll(http, "user5", "pw5")
    serial = _serial(user_pem)
    other = json.dumps({"serial": "abc", "reason": ""}).encode()
    response = await _signed_post(
        http, "/api/v1/revoke", {"serial": serial}, admin_pem, admin_key, signed_body=other
    )
    _assert_error(response, 401, 20)
    # a token for gencrl does not authorise revoke
    raw = json.dumps({"serial": serial}).encode()
    token = create_fabric_token(admin_pem, admin_key, "POST", "/api/v1/gencrl", raw)
    response = await http.post("/api/v1/revoke", content=raw, headers={"Authorization": token})
    _assert_error(response, 401, 20)
    record = await ca.issued(serial)
    assert record is not None
    assert record.revoked_at is None


async def test_token_authorisation_rules(http: httpx.AsyncClient, ca: CertificateAuthority) -> None:
    await ca.register("admin", "adminpw", role="admin")
    await ca.register("client", "cpw")
    await ca.register("revoker", "rpw", attributes=[Attribute("hf.Revoker", "true")])
    admin_key, admin_pem, _ = await _enroll(http, "admin", "adminpw")
    client_key, client_pem, _ = await _enroll(http, "client", "cpw")
    rev_key, rev_pem, _ = await _enroll(http, "revoker", "rpw")
    target = _serial((await _enroll(http, "client", "cpw"))[1])

    # a client may neither revoke nor generate CRLs
    response = await _signed_post(
        http, "/api/v1/revoke", {"serial": target}, client_pem, client_key
    )
    _assert_error(response, 403, 71)
    response = await _signed_post(http, "/api/v1/gencrl", {}, client_pem, client_key)
    _assert_error(response, 403, 71)

    # a certificate of another CA with the admin's name is not trusted
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    rogue = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.certificate.subject)
        .public_key(rogue_key.public_key())
        .serial_number(int(_serial(admin_pem), 16))
        .not_valid_before(ca.certificate.not_valid_before_utc)
        .not_valid_after(ca.certificate.not_valid_after_utc)
        .sign(rogue_key, hashes.SHA256())
    )
    rogue_pem = rogue.public_bytes(serialization.Encoding.PEM)
    response = await _signed_post(http, "/api/v1/revoke", {"serial": target}, rogue_pem, rogue_key)
    _assert_error(response, 401, 20)

    # hf.Revoker may revoke (at the root path too, as fabric-ca-client calls it)
    response = await _signed_post(http, "/revoke", {"id": "client"}, rev_pem, rev_key)
    assert response.status_code == 200, response.text
    assert target in {r["Serial"] for r in response.json()["result"]["RevokedCerts"]}
    # the revoked client's own certificate no longer authenticates it
    response = await _signed_post(http, "/api/v1/gencrl", {}, client_pem, client_key)
    _assert_error(response, 401, 20)
    # and revoking by id stopped the identity from enrolling again
    _, _, response = await _enroll(http, "client", "cpw")
    _assert_error(response, 403, 71)

    # once revoked, the admin's token is refused
    response = await _signed_post(
        http, "/api/v1/revoke", {"serial": _serial(admin_pem)}, admin_pem, admin_key
    )
    assert response.status_code == 200
    response = await _signed_post(http, "/api/v1/gencrl", {}, admin_pem, admin_key)
    _assert_error(response, 401, 20)


async def test_cainfo(http: httpx.AsyncClient, ca: CertificateAuthority) -> None:
    response = await http.get("/api/v1/cainfo")
    assert response.status_code == 200
    chain = base64.b64decode(response.json()["result"]["CAChain"])
    assert x509.load_pem_x509_certificates(chain) == [ca.certificate]

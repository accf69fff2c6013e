"""The identity service over real gRPC and HTTP sockets, on SQLite and PostgreSQL.

The service is started with ``run_identity`` (what ``python -m`` runs): its own runtime
auth interceptor verifies tokens against its own JWKS endpoint over HTTP.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import jwt
import pytest
from _grpc_support import bearer, rpc_code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ledgerlens.events.v1 import events_pb2
from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.events import Subjects
from ledgerlens.runtime.testing import RedisDatabase
from ledgerlens.services.identity.app import RunningIdentity, run_identity
from ledgerlens.services.identity.settings import Settings

pytestmark = pytest.mark.integration

ADMIN_SCOPES = ["admin", "keys:admin", "certs:enroll", "tokens:introspect"]
Stub = Any  # identity_pb2_grpc.IdentityServiceAsyncStub exists only in the .pyi


def _settings(database_url: str, nats_url: str, tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        database_url=database_url,
        nats_url=nats_url,
        grpc_port=0,
        http_port=0,
        data_dir=str(tmp_path / "data"),
        shutdown_grace_seconds=1,
        **extra,
    )


@pytest.fixture
async def identity(
    database_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[RunningIdentity]:
    async with run_identity(_settings(database_url, nats_url, tmp_path)) as running:
        yield running


@pytest.fixture
async def stub(identity: RunningIdentity) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(identity.grpc_address) as channel:
        yield identity_pb2_grpc.IdentityServiceStub(channel)


@pytest.fixture
async def admin(identity: RunningIdentity) -> tuple[str, str]:
    record, secret = await identity.core.create_key("acme", "admin", ADMIN_SCOPES)
    return record.key_id, secret


async def _token(stub: Stub, key: tuple[str, str], scopes: list[str] | None = None) -> str:
    issued = await stub.IssueToken(
        identity_pb2.IssueTokenRequest(client_id=key[0], client_secret=key[1], scopes=scopes or [])
    )
    return issued.access_token


async def test_a_token_from_identity_is_accepted_by_its_own_interceptor(
    stub: Stub, admin: tuple[str, str]
) -> None:
    token = await _token(stub, admin)
    created = await stub.CreateApiKey(
        identity_pb2.CreateApiKeyRequest(name="reader", scopes=["search:read"]),
        metadata=bearer(token),
    )
    assert created.key.tenant_id == "acme"
    assert created.key.state == identity_pb2.API_KEY_STATE_ACTIVE
    assert created.secret
    listed = await stub.ListApiKeys(identity_pb2.ListApiKeysRequest(), metadata=bearer(token))
    assert {k.key_id for k in listed.keys} >= {admin[0], created.key.key_id}
    assert all(not hasattr(k, "secret") for k in listed.keys)


async def test_bad_tokens_are_unauthenticated(
    identity: RunningIdentity, stub: Stub, admin: tuple[str, str]
) -> None:
    good = await _token(stub, admin)
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] = "admin keys:admin certs:enroll tokens:introspect ledger:submit"
    tampered_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    tampered = f"{header}.{tampered_payload.decode()}.{signature}"

    none_header = base64.urlsafe_b64encode(
        json.dumps(
            {"alg": "none", "typ": "JWT", "kid": jwt.get_unverified_header(good)["kid"]}
        ).encode()
    ).rstrip(b"=")
    alg_none = f"{none_header.decode()}.{payload}."

    wrong_aud_claims = {**claims, "aud": "someone-else", "scope": "keys:admin"}
    wrong_aud, _ = await identity.core.signing.sign(wrong_aud_claims)

    stranger = DevTokenIssuer(issuer="ledgerlens-identity")  # a key identity never had
    unknown_kid = stranger.issue("llk_x", ["keys:admin"], tenant="acme")

    request = identity_pb2.ListApiKeysRequest()
    assert await rpc_code(stub.ListApiKeys(request)) == grpc.StatusCode.UNAUTHENTICATED
    for bad in (tampered, alg_none, wrong_aud, unknown_kid):
        code = await rpc_code(stub.ListApiKeys(request, metadata=bearer(bad)))
        assert code == grpc.StatusCode.UNAUTHENTICATED, bad
    # and a good token lacking the scope is refused with PERMISSION_DENIED
    reader, reader_secret = await identity.core.create_key("acme", "r", ["search:read"])
    weak = await _token(stub, (reader.key_id, reader_secret))
    assert await rpc_code(stub.ListApiKeys(request, metadata=bearer(weak))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


async def test_another_tenant_needs_admin(identity: RunningIdentity, stub: Stub) -> None:
    key, secret = await identity.core.create_key("acme", "keys only", ["keys:admin"])
    token = await _token(stub, (key.key_id, secret))
    other = identity_pb2.CreateApiKeyRequest(tenant_id="globex", name="x", scopes=["search:read"])
    assert await rpc_code(stub.CreateApiKey(other, metadata=bearer(token))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


async def test_revoked_key_gets_no_token_and_the_revocation_is_published(
    identity: RunningIdentity, stub: Stub, admin: tuple[str, str], nats_url: str
) -> None:
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(Subjects.IDENTITY_KEY_REVOKED, ordered_consumer=True)
        token = await _token(stub, admin)
        victim, secret = await identity.core.create_key("acme", "victim", ["search:read"])
        await _token(stub, (victim.key_id, secret))  # works before
        revoked = await stub.RevokeApiKey(
            identity_pb2.RevokeApiKeyRequest(key_id=victim.key_id, reason="leaked"),
            metadata=bearer(token),
        )
        assert revoked.key.state == identity_pb2.API_KEY_STATE_REVOKED
        assert (
            await rpc_code(
                stub.IssueToken(
                    identity_pb2.IssueTokenRequest(client_id=victim.key_id, client_secret=secret)
                )
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )

        deadline = time.monotonic() + 10
        seen = None
        while seen is None and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1)
            except TimeoutError:
                continue
            event = events_pb2.ApiKeyRevoked.FromString(msg.data)
            if event.key_id == victim.key_id:
                seen = event
        assert seen is not None, "ApiKeyRevoked not published"
        assert seen.tenant_id == "acme"
    finally:
        await nc.close()


async def test_rotation_keeps_old_tokens_valid(stub: Stub, admin: tuple[str, str]) -> None:
    old = await _token(stub, admin)
    rotated = await stub.RotateSigningKey(
        identity_pb2.RotateSigningKeyRequest(algorithm=identity_pb2.SIGNING_ALGORITHM_EDDSA),
        metadata=bearer(old),
    )
    assert rotated.previous_kid == jwt.get_unverified_header(old)["kid"]
    new = await _token(stub, admin)
    assert jwt.get_unverified_header(new)["kid"] == rotated.kid
    assert jwt.get_unverified_header(new)["alg"] == "EdDSA"
    # the interceptor learns the new kid from the JWKS, and still knows the old one
    for token in (old, new):
        await stub.ListApiKeys(identity_pb2.ListApiKeysRequest(), metadata=bearer(token))
    jwks = await stub.GetJwks(identity_pb2.GetJwksRequest())
    assert {k.kid for k in jwks.keys} == {rotated.kid, rotated.previous_kid}


async def test_oauth_token_endpoint_and_jwks_over_http(
    identity: RunningIdentity, admin: tuple[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=identity.http_url) as http:
        ok = await http.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": admin[0],
                "client_secret": admin[1],
                "scope": "keys:admin",
            },
        )
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["token_type"] == "Bearer"
        assert body["scope"] == "keys:admin"
        assert ok.headers["cache-control"] == "no-store"

        basic = await http.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=(admin[0], admin[1])
        )
        assert basic.status_code == 200

        bad = await http.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": admin[0],
                "client_secret": "wrong",
            },
        )
        assert bad.status_code == 401
        assert bad.json()["error"] == "invalid_client"
        assert "wrong" not in bad.text

        grant = await http.post("/oauth/token", data={"grant_type": "password"})
        assert grant.status_code == 400
        assert grant.json()["error"] == "unsupported_grant_type"

        scope = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(admin[0], admin[1]),
            params={},
        )
        assert scope.status_code == 200

        jwks = await http.get("/.well-known/jwks.json")
        assert jwks.status_code == 200
        assert jwks.headers["cache-control"].startswith("public, max-age=")
        kid = jwt.get_unverified_header(body["access_token"])["kid"]
        assert kid in {k["kid"] for k in jwks.json()["keys"]}


def _csr(key: Any, enrollment_id: str | None = "user1") -> str:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, enrollment_id)] if enrollment_id else []
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(names))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_enroll_revoke_and_crl_over_grpc(stub: Stub, admin: tuple[str, str]) -> None:
    token = await _token(stub, admin)
    key = ec.generate_private_key(ec.SECP256R1())
    enrolled = await stub.EnrollCertificate(
        identity_pb2.EnrollCertificateRequest(
            enrollment_id="user1", csr_pem=_csr(key), role=identity_pb2.CERTIFICATE_ROLE_CLIENT
        ),
        metadata=bearer(token),
    )
    cert = x509.load_pem_x509_certificate(enrolled.certificate_pem.encode())
    info = await stub.GetCaInfo(identity_pb2.GetCaInfoRequest())
    ca_cert = x509.load_pem_x509_certificate(info.chain_pem[0].encode())
    cert.verify_directly_issued_by(ca_cert)

    wrong_type = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EnrollCertificate(
            identity_pb2.EnrollCertificateRequest(enrollment_id="user2", csr_pem=_csr(wrong_type)),
            metadata=bearer(token),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields = [v.field for v in bad_request.field_violations]
    assert "csr_pem" in fields

    missing_id = identity_pb2.EnrollCertificateRequest(csr_pem=_csr(key))
    assert await rpc_code(stub.EnrollCertificate(missing_id, metadata=bearer(token))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )

    revoked = await stub.RevokeCertificate(
        identity_pb2.RevokeCertificateRequest(
            serial=enrolled.serial, reason=identity_pb2.REVOCATION_REASON_KEY_COMPROMISE
        ),
        metadata=bearer(token),
    )
    assert list(revoked.revoked_serials) == [enrolled.serial]
    crl_response = await stub.GetCrl(identity_pb2.GetCrlRequest())
    crl = x509.load_der_x509_crl(crl_response.crl)
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


@pytest.fixture(params=["in-process", "redis"])
def limiter_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    extra: dict[str, Any] = {"token_rate_per_key_per_minute": 3}
    if request.param == "redis":
        redis_db: RedisDatabase = request.getfixturevalue("redis_db")
        extra["redis_url"] = redis_db.url
    return extra


async def test_over_limit_token_requests_are_refused(
    sqlite_url: str, nats_url: str, tmp_path: Path, limiter_settings: dict[str, Any]
) -> None:
    settings = _settings(sqlite_url, nats_url, tmp_path, **limiter_settings)
    async with run_identity(settings) as running:
        record, secret = await running.core.create_key("acme", "k", ["search:read"])
        request = identity_pb2.IssueTokenRequest(client_id=record.key_id, client_secret=secret)
        async with grpc.aio.insecure_channel(running.grpc_address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            for _ in range(3):
                await stub.IssueToken(request)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.IssueToken(request)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(err.value)
        assert status is not None
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "RESOURCE_EXHAUSTED carries RetryInfo"
        async with httpx.AsyncClient(base_url=running.http_url) as http:
            over = await http.post(
                "/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(record.key_id, secret),
            )
        assert over.status_code == 429
        assert int(over.headers["retry-after"]) >= 1

"""The identity domain metrics, recorded by the real service over gRPC and HTTP.

The service runs as ``python -m`` runs it (``run_identity``), with its own auth
interceptor. The counters are process-wide (other tests may have moved them), so every
check is a delta between a read before and a read after. SQLite only: what is counted
does not depend on the database (the behaviour tests run on both).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _ca_fixtures as fx
import grpc
import grpc.aio
import httpx
import pytest
from _grpc_support import bearer, rpc_code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.services.identity import metrics
from ledgerlens.services.identity.app import RunningIdentity, run_identity
from ledgerlens.services.identity.fabric_ca import create_fabric_token
from ledgerlens.services.identity.settings import Settings

pytestmark = pytest.mark.integration

ADMIN_SCOPES = ["admin", "keys:admin", "certs:enroll", "tokens:introspect"]
ROTATION_DAYS = 7
Stub = Any
Labels = dict[str, str]


def _value(name: str, labels: Labels | None = None) -> float:
    value = REGISTRY.get_sample_value(name, labels or {})
    assert value is not None, f"{name}{labels} is not exposed"
    return value


class Deltas:
    """Reads the given samples now; :meth:`changes` says how much each moved since."""

    def __init__(self, samples: dict[str, tuple[str, Labels]]) -> None:
        self.samples = samples
        self.before = {key: _value(name, labels) for key, (name, labels) in samples.items()}

    def changes(self) -> dict[str, float]:
        return {
            key: _value(name, labels) - self.before[key]
            for key, (name, labels) in self.samples.items()
        }


def _issued(via: str) -> tuple[str, Labels]:
    return "ledgerlens_identity_tokens_issued_total", {"grant": "client_credentials", "via": via}


def _failed(reason: str) -> tuple[str, Labels]:
    return "ledgerlens_identity_token_failures_total", {"reason": reason}


def _ca(operation: str, outcome: str) -> tuple[str, Labels]:
    return "ledgerlens_identity_ca_operations_total", {"operation": operation, "outcome": outcome}


@pytest.fixture
async def identity(
    sqlite_url: str, nats_url: str, tmp_path: Path
) -> AsyncIterator[RunningIdentity]:
    settings = Settings(
        database_url=sqlite_url,
        nats_url=nats_url,
        grpc_port=0,
        http_port=0,
        data_dir=str(tmp_path / "data"),
        shutdown_grace_seconds=1,
        bad_secret_max_delay_seconds=0,
        token_rate_per_key_per_minute=3,
        signing_key_rotation_days=ROTATION_DAYS,
    )
    async with run_identity(settings) as running:
        yield running


@pytest.fixture
async def stub(identity: RunningIdentity) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(identity.grpc_address) as channel:
        yield identity_pb2_grpc.IdentityServiceStub(channel)


@pytest.fixture
async def http(identity: RunningIdentity) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=identity.http_url, timeout=10) as client:
        yield client


@pytest.fixture
async def admin_token(identity: RunningIdentity, stub: Stub) -> str:
    record, secret = await identity.core.create_key("acme", "admin", ADMIN_SCOPES)
    return await _token(stub, record.key_id, secret)


async def _token(stub: Stub, key_id: str, secret: str, scopes: list[str] | None = None) -> str:
    issued = await stub.IssueToken(
        identity_pb2.IssueTokenRequest(client_id=key_id, client_secret=secret, scopes=scopes or [])
    )
    return str(issued.access_token)


async def test_tokens_issued_and_refused_are_counted_by_transport_and_reason(
    identity: RunningIdentity, stub: Stub, http: httpx.AsyncClient
) -> None:
    core = identity.core
    expires_at = datetime.now(UTC) + timedelta(seconds=1.5)
    expiring, expiring_secret = await core.create_key("acme", "soon", ["search:read"], expires_at)
    reader, reader_secret = await core.create_key("acme", "reader", ["search:read"])
    limited, limited_secret = await core.create_key("acme", "limited", ["search:read"])
    web, web_secret = await core.create_key("acme", "web", ["search:read"])
    gone, gone_secret = await core.create_key("acme", "gone", ["search:read"])
    await core.revoke_key(gone.key_id)
    reasons = (
        "invalid_client",
        "revoked",
        "expired",
        "invalid_scope",
        "invalid_audience",
        "rate_limited",
        "invalid_request",
        "unsupported_grant_type",
        "error",
    )
    deltas = Deltas(
        {
            "grpc": _issued("grpc"),
            "http": _issued("http"),
            **{reason: _failed(reason) for reason in reasons},
            "limited_key": ("ledgerlens_identity_rate_limited_total", {"scope": "key"}),
            "limited_address": ("ledgerlens_identity_rate_limited_total", {"scope": "address"}),
        }
    )

    # gRPC: two tokens, then a wrong secret, a revoked key, a scope and an audience it lacks
    await _token(stub, reader.key_id, reader_secret)
    await _token(stub, reader.key_id, reader_secret, ["search:read"])
    bad = identity_pb2.IssueTokenRequest(client_id=reader.key_id, client_secret="llks_wrong")
    assert await rpc_code(stub.IssueToken(bad)) == grpc.StatusCode.UNAUTHENTICATED
    revoked = identity_pb2.IssueTokenRequest(client_id=gone.key_id, client_secret=gone_secret)
    assert await rpc_code(stub.IssueToken(revoked)) == grpc.StatusCode.UNAUTHENTICATED
    wide = identity_pb2.IssueTokenRequest(
        client_id=limited.key_id, client_secret=limited_secret, scopes=["admin"]
    )
    assert await rpc_code(stub.IssueToken(wide)) == grpc.StatusCode.INVALID_ARGUMENT
    elsewhere = identity_pb2.IssueTokenRequest(
        client_id=limited.key_id, client_secret=limited_secret, audience="someone-else"
    )
    assert await rpc_code(stub.IssueToken(elsewhere)) == grpc.StatusCode.INVALID_ARGUMENT
    # the limit is 3 a minute per key: the two refusals above were hits, so one more
    # token is let through and the next request is refused
    await _token(stub, limited.key_id, limited_secret)
    again = identity_pb2.IssueTokenRequest(client_id=limited.key_id, client_secret=limited_secret)
    assert await rpc_code(stub.IssueToken(again)) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # HTTP: one token, a wrong secret, a scope it lacks, a wrong grant, a missing secret
    form = {"grant_type": "client_credentials", "client_id": web.key_id}
    ok = await http.post("/oauth/token", data={**form, "client_secret": web_secret})
    assert ok.status_code == 200, ok.text
    wrong = await http.post("/oauth/token", data={**form, "client_secret": "llks_wrong"})
    assert wrong.json()["error"] == "invalid_client"
    scope = await http.post(
        "/oauth/token", data={**form, "client_secret": web_secret, "scope": "admin"}
    )
    assert scope.json()["error"] == "invalid_scope"
    grant = await http.post(
        "/oauth/token",
        data={**form, "grant_type": "password", "client_secret": web_secret},
    )
    assert grant.json()["error"] == "unsupported_grant_type"
    missing = await http.post("/oauth/token", data=form)
    assert missing.json()["error"] == "invalid_request"

    # an expired key: the right secret, but too late
    await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.1)
    late = await http.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": expiring.key_id,
            "client_secret": expiring_secret,
        },
    )
    assert late.status_code == 401, late.text

    assert deltas.changes() == {
        "grpc": 3,
        "http": 1,
        "invalid_client": 2,
        "revoked": 1,
        "expired": 1,
        "invalid_scope": 2,
        "invalid_audience": 1,
        "rate_limited": 1,
        "invalid_request": 1,
        "unsupported_grant_type": 1,
        "error": 0,
        "limited_key": 1,
        "limited_address": 0,
    }


async def test_keys_rotation_and_introspection_are_counted(
    identity: RunningIdentity, stub: Stub, admin_token: str
) -> None:
    rotation = "ledgerlens_identity_signing_key_rotations_total"
    deltas = Deltas(
        {
            "created": ("ledgerlens_identity_api_keys_total", {"action": "created"}),
            "revoked": ("ledgerlens_identity_api_keys_total", {"action": "revoked"}),
            "rotations": (rotation, {}),
            **{
                f"introspected_{state}": (
                    "ledgerlens_identity_introspections_total",
                    {"result": state},
                )
                for state in ("active", "expired", "revoked", "invalid")
            },
        }
    )
    meta = bearer(admin_token)
    created = []
    for name in ("a", "b"):
        response = await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name=name, scopes=["search:read"]), metadata=meta
        )
        created.append(response)
    token_of_b = await _token(stub, created[1].key.key_id, created[1].secret)
    revoke = identity_pb2.RevokeApiKeyRequest(key_id=created[1].key.key_id, reason="test")
    await stub.RevokeApiKey(revoke, metadata=meta)
    await stub.RevokeApiKey(revoke, metadata=meta)  # again: unchanged, not counted
    # a key refused for bad input is not counted as created
    too_late = Timestamp()
    too_late.FromDatetime(datetime.now(UTC) - timedelta(days=1))
    refused = identity_pb2.CreateApiKeyRequest(
        name="c", scopes=["search:read"], expires_at=too_late
    )
    assert await rpc_code(stub.CreateApiKey(refused, metadata=meta)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )

    for token in (admin_token, token_of_b, "not-a-jwt", admin_token):
        await stub.Introspect(identity_pb2.IntrospectRequest(token=token), metadata=meta)

    period = _value("ledgerlens_identity_signing_key_rotation_period_seconds")
    assert period == ROTATION_DAYS * 86_400
    rotated = await stub.RotateSigningKey(identity_pb2.RotateSigningKeyRequest(), metadata=meta)
    rotated_at = time.time()
    assert rotated.previous_kid
    assert rotated.kid != rotated.previous_kid
    await asyncio.sleep(1.0)
    # read at scrape time from the key that is active now (just rotated)
    age = _value("ledgerlens_identity_signing_key_age_seconds")
    assert 0.9 <= age <= time.time() - rotated_at + 1.0, age

    assert deltas.changes() == {
        "created": 2,
        "revoked": 1,
        "rotations": 1,
        "introspected_active": 2,
        "introspected_expired": 0,
        "introspected_revoked": 1,
        "introspected_invalid": 1,
    }


def _csr(key: Any, enrollment_id: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, enrollment_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def _fabric_enroll(http: httpx.AsyncClient, user: str, secret: str) -> tuple[Any, bytes]:
    key, csr = fx.make_csr()
    basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
    response = await http.post(
        "/api/v1/enroll",
        json={"certificate_request": csr, "profile": ""},
        headers={"Authorization": f"Basic {basic}"},
    )
    if response.status_code != 200:
        return key, b""
    return key, base64.b64decode(response.json()["result"]["Cert"])


async def _fabric_gencrl(http: httpx.AsyncClient, cert_pem: bytes, key: Any) -> httpx.Response:
    raw = json.dumps({}).encode()
    token = create_fabric_token(cert_pem, key, "POST", "/api/v1/gencrl", raw)
    return await http.post(
        "/api/v1/gencrl",
        content=raw,
        headers={"Authorization": token, "Content-Type": "application/json"},
    )


async def test_ca_operations_over_grpc_and_fabric_rest_are_counted(
    identity: RunningIdentity, stub: Stub, http: httpx.AsyncClient, admin_token: str
) -> None:
    await identity.ca.register("ca-admin", "adminpw", role="admin")
    await identity.ca.register("plain", "plainpw")
    deltas = Deltas(
        {
            f"{op}_{outcome}": _ca(op, outcome)
            for op in ("enroll", "revoke", "gencrl")
            for outcome in ("ok", "refused")
        }
    )
    meta = bearer(admin_token)

    # gRPC: an enrollment, a CSR with the wrong curve, a revocation, an unknown serial, a CRL
    enrolled = await stub.EnrollCertificate(
        identity_pb2.EnrollCertificateRequest(
            enrollment_id="user1", csr_pem=_csr(ec.generate_private_key(ec.SECP256R1()), "user1")
        ),
        metadata=meta,
    )
    wrong_curve = identity_pb2.EnrollCertificateRequest(
        enrollment_id="user2", csr_pem=_csr(ec.generate_private_key(ec.SECP384R1()), "user2")
    )
    assert await rpc_code(stub.EnrollCertificate(wrong_curve, metadata=meta)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    await stub.RevokeCertificate(
        identity_pb2.RevokeCertificateRequest(serial=enrolled.serial), metadata=meta
    )
    unknown = identity_pb2.RevokeCertificateRequest(serial="7e57")
    assert await rpc_code(stub.RevokeCertificate(unknown, metadata=meta)) == (
        grpc.StatusCode.NOT_FOUND
    )
    await stub.GetCrl(identity_pb2.GetCrlRequest())

    # Fabric CA REST: two enrollments and a wrong secret; a CRL by the admin, refused to
    # an identity that is neither admin nor hf.GenCRL
    admin_key, admin_pem = await _fabric_enroll(http, "ca-admin", "adminpw")
    plain_key, plain_pem = await _fabric_enroll(http, "plain", "plainpw")
    assert admin_pem
    assert plain_pem
    _, nothing = await _fabric_enroll(http, "plain", "wrong")
    assert nothing == b""
    assert (await _fabric_gencrl(http, admin_pem, admin_key)).status_code == 200
    assert (await _fabric_gencrl(http, plain_pem, plain_key)).status_code == 403

    assert deltas.changes() == {
        "enroll_ok": 3,
        "enroll_refused": 2,
        "revoke_ok": 1,
        "revoke_refused": 1,
        "gencrl_ok": 2,
        "gencrl_refused": 1,
    }


def test_the_age_gauge_is_nan_without_a_running_service_key() -> None:
    """Between services (or before the first), the age is unknown, not a stale number."""

    class Keyless:
        def active_key_activated_at(self) -> datetime | None:
            return None

        def now(self) -> datetime:
            return datetime.now(UTC)

    owner = Keyless()
    metrics.watch_signing_key(owner, 86_400)
    assert math.isnan(_value("ledgerlens_identity_signing_key_age_seconds"))
    metrics.unwatch_signing_key(owner)
    assert math.isnan(_value("ledgerlens_identity_signing_key_age_seconds"))

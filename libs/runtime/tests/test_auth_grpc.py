"""Bearer-token auth and scope checks of the runtime's interceptor, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import grpc
import grpc.aio
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.errors import PermissionDenied, Unauthenticated, from_rpc_error

pytestmark = pytest.mark.integration

Mint = Callable[..., str]


def _md(token: str, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"{scheme} {token}"),)


async def _create(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, metadata: tuple[tuple[str, str], ...] | None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateApiKey(
            identity_pb2.CreateApiKeyRequest(name="x"), metadata=metadata, timeout=5
        )
    return err.value


def _claims(issuer: DevTokenIssuer, **overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": issuer.issuer,
        "sub": "mallory",
        "aud": "ledgerlens",
        "iat": now,
        "exp": now + 300,
        "jti": "j1",
        "scope": "keys:admin",
        "tenant": "acme",
    }
    claims.update(overrides)
    return claims


async def _assert_unauthenticated(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...] | None,
    reason: str,
) -> None:
    error = await _create(stub, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    domain = from_rpc_error(error)
    assert isinstance(domain, Unauthenticated)
    assert domain.reason == reason


async def test_without_a_token(stub: identity_pb2_grpc.IdentityServiceAsyncStub) -> None:
    await _assert_unauthenticated(stub, None, "TOKEN_MISSING")


async def test_with_a_non_bearer_scheme(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, mint: Mint
) -> None:
    await _assert_unauthenticated(stub, _md(mint(), scheme="Basic"), "TOKEN_MALFORMED")


async def test_with_garbage(stub: identity_pb2_grpc.IdentityServiceAsyncStub) -> None:
    await _assert_unauthenticated(stub, _md("not.a.jwt"), "TOKEN_MALFORMED")


async def test_with_an_expired_token(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, mint: Mint
) -> None:
    # issued 20 minutes ago for 10 minutes: expired well beyond the 5 s leeway
    token = mint(issued_at=time.time() - 1200, ttl=600)
    await _assert_unauthenticated(stub, _md(token), "TOKEN_EXPIRED")


async def test_with_a_wrong_audience(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, mint: Mint
) -> None:
    await _assert_unauthenticated(stub, _md(mint(audience="someone-else")), "TOKEN_AUDIENCE")


async def test_with_a_wrong_issuer(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, issuer: DevTokenIssuer, mint: Mint
) -> None:
    token = mint(extra_claims={"iss": "evil-identity"})
    await _assert_unauthenticated(stub, _md(token), "TOKEN_ISSUER")


async def test_with_alg_none(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, issuer: DevTokenIssuer
) -> None:
    token = jwt.encode(
        _claims(issuer),
        None,  # type: ignore[arg-type]
        algorithm="none",
        headers={"kid": issuer.kid},
    )
    await _assert_unauthenticated(stub, _md(token), "TOKEN_ALGORITHM")


async def test_with_hmac_signed_by_the_public_key(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, issuer: DevTokenIssuer
) -> None:
    # the classic confusion attack: HS256 keyed with the verifier's public key. PyJWT
    # refuses to produce such a token, so it is assembled by hand.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = (
        b64(json.dumps(header).encode()) + b"." + b64(json.dumps(_claims(issuer)).encode())
    )
    secret = json.dumps(issuer.public_jwk()).encode()
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    token = (signing_input + b"." + b64(signature)).decode()
    await _assert_unauthenticated(stub, _md(token), "TOKEN_ALGORITHM")


async def test_with_an_unknown_kid(stub: identity_pb2_grpc.IdentityServiceAsyncStub) -> None:
    stranger = DevTokenIssuer()  # same issuer name, a key the server never saw
    token = stranger.issue("mallory", ["keys:admin"], tenant="acme")
    await _assert_unauthenticated(stub, _md(token), "TOKEN_KID_UNKNOWN")


async def test_with_a_forged_signature_under_a_known_kid(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, issuer: DevTokenIssuer
) -> None:
    forger = DevTokenIssuer(kid=issuer.kid)
    token = forger.issue("mallory", ["keys:admin"], tenant="acme")
    await _assert_unauthenticated(stub, _md(token), "TOKEN_INVALID")


async def test_with_a_missing_required_claim(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, mint: Mint
) -> None:
    token = mint(extra_claims={"tenant": ""})
    await _assert_unauthenticated(stub, _md(token), "TOKEN_CLAIMS")


async def test_lacking_a_scope_is_permission_denied_naming_it(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, mint: Mint
) -> None:
    error = await _create(stub, _md(mint(["search:read", "tokens:introspect"])))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "keys:admin" in (error.details() or "")
    domain = from_rpc_error(error)
    assert isinstance(domain, PermissionDenied)
    assert domain.metadata == {"scope": "keys:admin"}


async def test_scopes_are_not_interchangeable(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, mint: Mint
) -> None:
    token = mint(["keys:admin"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Introspect(identity_pb2.IntrospectRequest(), metadata=_md(token), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tokens:introspect" in (err.value.details() or "")
    # the same caller with the right scope gets through, and the servicer sees who it is
    reply = await stub.Introspect(
        identity_pb2.IntrospectRequest(),
        metadata=_md(mint(["tokens:introspect", "admin"], tenant="t9")),
        timeout=5,
    )
    assert (reply.subject, reply.tenant_id) == ("alice", "t9")
    assert list(reply.scopes) == ["admin", "tokens:introspect"]


async def test_public_rpc_and_health_need_no_token(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, channel: grpc.aio.Channel
) -> None:
    reply = await stub.GetJwks(identity_pb2.GetJwksRequest(), timeout=5)
    assert reply.max_age_seconds == 60
    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_concurrent_calls_each_see_their_own_caller(
    stub: identity_pb2_grpc.IdentityServiceAsyncStub, issuer: DevTokenIssuer
) -> None:
    # The call's state (metadata, principal) is bound when grpc.aio looks its handler
    # up; interleaved calls of many callers must never see each other's.
    callers = [(f"user{i}", f"tenant{i % 7}") for i in range(64)]
    tokens = [
        issuer.issue(subject, ["tokens:introspect"], tenant=tenant, audience="ledgerlens")
        for subject, tenant in callers
    ]

    async def introspect(token: str) -> identity_pb2.IntrospectResponse:
        reply: identity_pb2.IntrospectResponse = await stub.Introspect(
            identity_pb2.IntrospectRequest(), metadata=_md(token), timeout=10
        )
        return reply

    for _ in range(3):  # the first round verifies signatures, later ones reuse them
        replies = await asyncio.gather(*(introspect(t) for t in tokens))
        assert [(r.subject, r.tenant_id) for r in replies] == callers

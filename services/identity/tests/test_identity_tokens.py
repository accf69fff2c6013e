"""Tokens: issue, verify with the runtime's TokenVerifier, rotation, introspection, abuse."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.auth import TokenVerifier
from ledgerlens.runtime.errors import InvalidArgument, Unauthenticated
from ledgerlens.services.identity.ratelimit import BadSecretThrottle
from ledgerlens.services.identity.secrets_box import (
    KEK_FILE_NAME,
    SecretsBox,
    SecretsBoxError,
    load_or_create_kek,
)
from ledgerlens.services.identity.service import IdentityCore, TokenState
from ledgerlens.services.identity.settings import Settings
from ledgerlens.services.identity.tokens import RETIREMENT_LEEWAY_SECONDS, jwk_thumbprint


def _verifier(core: IdentityCore, jwks_json: str) -> TokenVerifier:
    return TokenVerifier(
        issuer=core.settings.issuer, audience=core.settings.audience, static_jwks=jwks_json
    )


async def _key(core: IdentityCore, scopes: list[str] | None = None) -> tuple[str, str]:
    record, secret = await core.create_key("acme", "k", scopes or ["search:read", "ledger:read"])
    return record.key_id, secret


async def test_token_verifies_with_the_runtime_verifier(core: IdentityCore, clock: Any) -> None:
    key_id, secret = await _key(core)
    issued = await core.issue_token(key_id, secret, client_address="10.0.0.1")
    assert issued.expires_in == core.settings.token_ttl_seconds
    assert issued.expires_at == clock() + timedelta(seconds=core.settings.token_ttl_seconds)
    jwks = await core.jwks()
    principal = await _verifier(core, jwks.to_json()).verify(issued.access_token)
    assert principal.subject == key_id
    assert principal.tenant == "acme"
    assert principal.scopes == frozenset({"search:read", "ledger:read"})
    header = jwt.get_unverified_header(issued.access_token)
    assert header["kid"] == issued.kid == jwks.keys[0].kid
    assert header["alg"] == "ES256"
    claims = jwt.decode(issued.access_token, options={"verify_signature": False})
    assert set(claims) >= {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "tenant", "scope"}
    assert claims["aud"] == core.settings.audience
    # the kid is the RFC 7638 thumbprint of the public key
    assert jwk_thumbprint(jwks.as_dict()["keys"][0]) == issued.kid
    # and a tampered payload does not verify
    head, _body, sig = issued.access_token.split(".")
    forged = dict(claims, scope="admin")
    forged_body = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    with pytest.raises(Unauthenticated):
        await _verifier(core, jwks.to_json()).verify(f"{head}.{forged_body}.{sig}")


async def test_rotation_keeps_old_tokens_valid_until_not_after(
    core: IdentityCore, clock: Any
) -> None:
    key_id, secret = await _key(core)
    old = await core.issue_token(key_id, secret)
    rotation = await core.rotate()
    assert rotation.previous_kid == old.kid
    assert rotation.kid != old.kid
    retention = core.settings.token_ttl_seconds + RETIREMENT_LEEWAY_SECONDS
    assert rotation.previous_retire_after == clock() + timedelta(seconds=retention)

    new = await core.issue_token(key_id, secret)
    assert new.kid == rotation.kid
    assert jwt.get_unverified_header(new.access_token)["kid"] == rotation.kid
    jwks = await core.jwks()
    by_kid = {k.kid: k for k in jwks.keys}
    assert set(by_kid) == {old.kid, new.kid}
    assert by_kid[new.kid].active
    assert not by_kid[old.kid].active
    assert by_kid[old.kid].retire_after == rotation.previous_retire_after
    assert 0 < jwks.max_age_seconds <= 300
    verifier = _verifier(core, jwks.to_json())
    assert (await verifier.verify(old.access_token)).subject == key_id
    assert (await verifier.verify(new.access_token)).subject == key_id

    clock.advance(retention - 10)
    assert {k.kid for k in (await core.jwks()).keys} == {old.kid, new.kid}
    assert (await core.jwks()).max_age_seconds <= 10
    clock.advance(11)  # past the old key's not_after
    later = await core.jwks()
    assert [k.kid for k in later.keys] == [new.kid]
    with pytest.raises(Unauthenticated) as err:
        await _verifier(core, later.to_json()).verify(old.access_token)
    assert err.value.reason == "TOKEN_KID_UNKNOWN"


async def test_rotate_to_eddsa_and_restart_keeps_the_active_key(
    core: IdentityCore, engine: AsyncEngine, settings: Settings, clock: Any, kek: bytes
) -> None:
    key_id, secret = await _key(core)
    rotation = await core.rotate("EdDSA")
    issued = await core.issue_token(key_id, secret)
    assert jwt.get_unverified_header(issued.access_token)["alg"] == "EdDSA"
    jwks = await core.jwks()
    okp = next(k for k in jwks.keys if k.kid == rotation.kid)
    assert (okp.kty, okp.crv, okp.y) == ("OKP", "Ed25519", "")
    assert (await _verifier(core, jwks.to_json()).verify(issued.access_token)).subject == key_id
    # another replica on the same database and KEK: same active key, no new one
    other = IdentityCore(settings, engine, clock=clock, kek=kek)
    await other.start()
    assert [k.kid for k in (await other.jwks()).keys if k.active] == [rotation.kid]
    assert (await other.introspect(issued.access_token)).state is TokenState.ACTIVE
    assert (await other.issue_token(key_id, secret)).kid == rotation.kid
    # a replica with another KEK cannot read the signing key (nor the key hashes)
    wrong = IdentityCore(settings, engine, clock=clock, kek=secrets.token_bytes(32))
    with pytest.raises(SecretsBoxError):
        await wrong.start()


async def test_revoked_and_expired_keys_get_no_token(core: IdentityCore, clock: Any) -> None:
    key_id, secret = await _key(core)
    await core.revoke_key(key_id, "gone")
    with pytest.raises(Unauthenticated, match="revoked"):
        await core.issue_token(key_id, secret)
    record, expiring_secret = await core.create_key(
        "acme", "e", ["search:read"], clock() + timedelta(seconds=30)
    )
    await core.issue_token(record.key_id, expiring_secret)
    clock.advance(31)
    with pytest.raises(Unauthenticated, match="expired"):
        await core.issue_token(record.key_id, expiring_secret)


async def test_scopes_subset_and_audience(core: IdentityCore) -> None:
    key_id, secret = await _key(core, ["search:read", "ledger:read"])
    all_scopes = await core.issue_token(key_id, secret, [])
    assert all_scopes.scopes == ("search:read", "ledger:read")
    some = await core.issue_token(key_id, secret, ["ledger:read"])
    assert some.scopes == ("ledger:read",)
    claims = jwt.decode(some.access_token, options={"verify_signature": False})
    assert claims["scope"] == "ledger:read"
    with pytest.raises(InvalidArgument) as err:
        await core.issue_token(key_id, secret, ["ledger:read", "admin"])
    assert err.value.reason == "INVALID_SCOPE"
    assert err.value.violations[0][0] == "scopes"
    with pytest.raises(InvalidArgument) as aud:
        await core.issue_token(key_id, secret, audience="somewhere-else")
    assert aud.value.violations[0][0] == "audience"
    explicit = await core.issue_token(key_id, secret, audience=core.settings.audience)
    assert jwt.decode(explicit.access_token, options={"verify_signature": False})["aud"] == (
        core.settings.audience
    )


async def test_introspect_states(core: IdentityCore, clock: Any) -> None:
    key_id, secret = await _key(core)
    issued = await core.issue_token(key_id, secret)
    active = await core.introspect(issued.access_token)
    assert active.active
    assert active.state is TokenState.ACTIVE
    assert (active.subject, active.tenant_id, active.kid) == (key_id, "acme", issued.kid)
    assert active.scopes == issued.scopes
    assert active.expires_at == issued.expires_at
    assert active.issuer == core.settings.issuer
    assert active.jti

    # after a rotation, the old key still introspects its tokens
    await core.rotate()
    assert (await core.introspect(issued.access_token)).state is TokenState.ACTIVE

    clock.advance(core.settings.token_ttl_seconds)
    expired = await core.introspect(issued.access_token)
    assert expired.state is TokenState.EXPIRED
    assert not expired.active
    assert expired.subject == key_id

    fresh = await core.issue_token(key_id, secret)
    await core.revoke_key(key_id)
    revoked = await core.introspect(fresh.access_token)
    assert revoked.state is TokenState.REVOKED
    assert not revoked.active

    for bad in ["", "garbage", fresh.access_token[:-4] + "AAAA", "x" * 9000]:
        result = await core.introspect(bad)
        assert result.state is TokenState.INVALID
        assert result.subject == ""
    # a token signed by some other key with a kid we do not know
    other = jwt.encode(
        {
            "sub": key_id,
            "exp": 2**31,
            "iat": 1,
            "jti": "j",
            "iss": core.settings.issuer,
            "aud": core.settings.audience,
        },
        "secret-hmac-key-of-enough-length-000000",
        algorithm="HS256",
        headers={"kid": fresh.kid},
    )
    assert (await core.introspect(other)).state is TokenState.INVALID


async def test_bad_secrets_are_delayed_and_never_logged(
    core: IdentityCore, fake_sleep: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key_id, secret = await _key(core)
    wrong = "lls_" + secrets.token_urlsafe(32)
    caplog.set_level(logging.DEBUG)
    for _ in range(8):
        with pytest.raises(Unauthenticated):
            await core.issue_token(key_id, wrong, client_address="10.9.8.7")
    delays = fake_sleep.calls
    assert len(delays) == 8
    assert delays == sorted(delays)
    assert delays[0] < delays[-1]
    assert max(delays) == core.settings.bad_secret_max_delay_seconds
    assert any(key_id in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # a success resets the count
    issued = await core.issue_token(key_id, secret, client_address="10.9.8.7")
    with pytest.raises(Unauthenticated):
        await core.issue_token(key_id, wrong, client_address="10.9.8.7")
    assert fake_sleep.calls[-1] == delays[0]
    # a misplaced secret in client_id is not logged either
    with pytest.raises(Unauthenticated):
        await core.issue_token(secret, secret, client_address="10.9.8.7")

    logged = caplog.text + "".join(repr(r.args) + str(r.msg) for r in caplog.records)
    for text in (secret, secret[4:], wrong, wrong[4:], issued.access_token):
        assert text not in logged


def test_throttle_grows_and_caps() -> None:
    now = [0.0]
    throttle = BadSecretThrottle(1.0, base_delay=0.1, forget_after=60, clock=lambda: now[0])
    delays = [throttle.record_failure("k", "a")[1] for _ in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    count, delay = throttle.record_failure("k", "other-address")
    assert count == 1
    assert delay == pytest.approx(0.1)
    now[0] = 61
    assert throttle.failures("k", "a") == 0


def test_kek_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    kek = load_or_create_kek(None, str(data))
    path = data / KEK_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_kek(None, str(data)) == kek
    assert load_or_create_kek(str(path), "/nonexistent") == kek
    box = SecretsBox(kek)
    blob = box.encrypt(b"private", b"kid-1")
    assert b"private" not in blob
    assert box.decrypt(blob, b"kid-1") == b"private"
    with pytest.raises(SecretsBoxError):
        box.decrypt(blob, b"kid-2")  # bound to its kid
    with pytest.raises(SecretsBoxError):
        SecretsBox(secrets.token_bytes(32)).decrypt(blob, b"kid-1")
    bad = tmp_path / "short"
    bad.write_text("c2hvcnQ")
    with pytest.raises(ValueError, match="32 bytes"):
        load_or_create_kek(str(bad), str(data))

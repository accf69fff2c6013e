"""Bearer JWT verification against identity's JWKS, and the caller's :class:`Principal`.

Tokens are ES256 or EdDSA JWTs issued by the identity service. :class:`TokenVerifier`
checks, in this order: the header (``alg`` allowed and never ``none``/HMAC, ``kid``
present) *before* any key lookup; the key by ``kid`` (fetching identity's JWKS when
the kid is unknown, rate-limited); the signature, ``iss``, ``aud``, ``exp``/``nbf``/
``iat`` with leeway and the required claims (PyJWT does these).

The warm path is cheap: parsed key objects are cached by ``kid``, and a token that
verified once is remembered (bounded, until its ``exp``) so a client reusing its token
costs a dict lookup and a clock read instead of a signature check. The remembered
tokens are dropped whenever the key set changes.

:class:`DevTokenIssuer` mints tokens for tests and the ``make up`` dev stack only; the
identity service is the real issuer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ledgerlens.runtime.calls import call_var
from ledgerlens.runtime.errors import Unauthenticated, Unavailable
from ledgerlens.runtime.settings import AuthSettings

__all__ = [
    "DevTokenIssuer",
    "Principal",
    "TokenVerifier",
    "current_principal",
]

_log = logging.getLogger(__name__)

#: the claim that names the caller's tenant.
TENANT_CLAIM = "tenant"
_REQUIRED_CLAIMS = ["sub", "exp", "iat", "jti"]
#: algorithms that are refused whatever the settings say: unsigned and symmetric ones
#: (a symmetric "key" would be the public JWKS, letting anyone forge tokens).
_FORBIDDEN_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
_ASYMMETRIC_ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "EdDSA", "Ed25519"})
_MAX_MISSING_KIDS = 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified claims of their bearer token."""

    subject: str
    tenant: str
    scopes: frozenset[str]
    token_id: str
    expires_at: float
    claims: Mapping[str, Any] = field(repr=False)
    #: the raw bearer token, to forward on calls made on the caller's behalf.
    token: str = field(repr=False, default="")

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


def current_principal() -> Principal | None:
    """The caller of the RPC being served (``None`` for public RPCs or auth disabled)."""
    call = call_var.get()
    return call.principal if call is not None else None


class TokenVerifier:
    """Verifies bearer JWTs; keys come from a JWKS URL (cached) or a static JWKS.

    Build it with :meth:`from_settings` (``AuthSettings``) or directly. ``verify`` raises
    :class:`~ledgerlens.runtime.errors.Unauthenticated` for any bad token, and
    :class:`~ledgerlens.runtime.errors.Unavailable` when the key set cannot be fetched
    and no key is known yet.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        static_jwks: Mapping[str, Any] | str | None = None,
        algorithms: Iterable[str] = ("ES256", "EdDSA"),
        leeway_seconds: float = 30.0,
        jwks_cache_seconds: float = 300.0,
        jwks_min_refresh_seconds: float = 1.0,
        http_timeout_seconds: float = 5.0,
        verified_cache_size: int = 10_000,
    ) -> None:
        if (jwks_url is None) == (static_jwks is None):
            raise ValueError("exactly one of jwks_url and static_jwks is required")
        allowed = frozenset(algorithms)
        bad = allowed - _ASYMMETRIC_ALGORITHMS
        if bad or not allowed:
            raise ValueError(f"unsupported or unsafe JWT algorithms: {sorted(bad) or 'none'}")
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = jwks_url
        self.algorithms = allowed
        self.leeway = leeway_seconds
        self.cache_seconds = jwks_cache_seconds
        self.min_refresh_seconds = jwks_min_refresh_seconds
        self._http_timeout = http_timeout_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        #: kids looked for and not found, and when (see ``_may_look_for``)
        self._missing: dict[str, float] = {}
        self._raw: dict[str, Any] = {}
        self._fetched_at: float | None = None  # monotonic time of the last fetch attempt
        self._loaded_at: float | None = None  # monotonic time of the last successful fetch
        self._refresh: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._verified: dict[str, Principal] = {}
        self._verified_max = verified_cache_size
        self._jwt = jwt.PyJWT()
        #: how many times the JWKS was fetched (observability and tests).
        self.fetch_count = 0
        if static_jwks is not None:
            doc = json.loads(static_jwks) if isinstance(static_jwks, str) else static_jwks
            self._set_keys(doc)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> TokenVerifier:
        return cls(
            issuer=settings.issuer,
            audience=settings.audience,
            jwks_url=None if settings.static_jwks else settings.jwks_url,
            static_jwks=settings.static_jwks,
            algorithms=settings.algorithms,
            leeway_seconds=settings.leeway_seconds,
            jwks_cache_seconds=settings.jwks_cache_seconds,
            jwks_min_refresh_seconds=settings.jwks_min_refresh_seconds,
        )

    # -- verification -------------------------------------------------------------------

    def remembered(self, token: str) -> Principal | None:
        """The principal of a token that verified before and is still valid, else ``None``.

        Synchronous, so the server's hot path needs no coroutine for a known token.
        """
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached.expires_at + self.leeway and (
                self.jwks_url is None or not self._stale()
            ):
                return cached
            self._verified.pop(token, None)
        return None

    async def verify(self, token: str) -> Principal:
        """The principal of a valid ``token``; raises ``Unauthenticated`` otherwise."""
        cached = self.remembered(token)
        if cached is not None:
            return cached
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg in _FORBIDDEN_ALGORITHMS or alg not in self.algorithms:
            raise Unauthenticated(
                f"token algorithm {alg!r} is not accepted", reason="TOKEN_ALGORITHM"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token has no key id (kid)", reason="TOKEN_KID_MISSING")
        key = await self._key(kid)
        principal = self._decode(token, key)
        if len(self._verified) >= self._verified_max:
            # dicts keep insertion order: drop the oldest entry (FIFO is enough here).
            self._verified.pop(next(iter(self._verified)))
        self._verified[token] = principal
        return principal

    def _decode(self, token: str, key: jwt.PyJWK) -> Principal:
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated("token audience mismatch", reason="TOKEN_AUDIENCE") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("token issuer mismatch", reason="TOKEN_ISSUER") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}", reason="TOKEN_INVALID") from exc
        scopes = _scopes(claims)
        tenant = claims.get(TENANT_CLAIM)
        if scopes is None or not isinstance(tenant, str) or not tenant:
            raise Unauthenticated(
                f"token lacks the scope(s) or {TENANT_CLAIM} claim", reason="TOKEN_CLAIMS"
            )
        sub, jti = claims["sub"], claims["jti"]
        if not isinstance(sub, str) or not isinstance(jti, str):
            raise Unauthenticated("token sub and jti must be strings", reason="TOKEN_CLAIMS")
        return Principal(
            subject=sub,
            tenant=tenant,
            scopes=scopes,
            token_id=jti,
            expires_at=float(claims["exp"]),
            claims=claims,
            token=token,
        )

    # -- keys -----------------------------------------------------------------------------

    def _stale(self) -> bool:
        """Whether the fetched JWKS outlived ``jwks_cache_seconds`` (never for static keys)."""
        return (
            self.jwks_url is not None
            and self._loaded_at is not None
            and time.monotonic() - self._loaded_at > self.cache_seconds
        )

    async def _key(self, kid: str) -> jwt.PyJWK:
        if self.jwks_url is not None:
            never = self._fetched_at is None
            if never or self._stale():
                await self._refetch(force=never)
            elif kid not in self._keys and self._may_look_for(kid):
                await self._refetch_when_allowed()
                if kid not in self._keys:
                    self._note_missing(kid)
            if not self._keys and self._loaded_at is None:
                raise Unavailable("signing keys are not available yet", retry_after=1.0)
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated(f"unknown signing key {kid!r}", reason="TOKEN_KID_UNKNOWN")
        return key

    def _may_look_for(self, kid: str) -> bool:
        """An unknown kid is looked for again only after ``jwks_min_refresh_seconds``."""
        missed = self._missing.get(kid)
        return missed is None or time.monotonic() - missed >= self.min_refresh_seconds

    def _note_missing(self, kid: str) -> None:
        if len(self._missing) >= _MAX_MISSING_KIDS:  # bounded: random kids cost nothing
            self._missing.clear()
        self._missing[kid] = time.monotonic()

    async def _refetch_when_allowed(self) -> None:
        """Refetch for a kid not seen yet, waiting out the refresh interval if needed.

        A token signed by a just-rotated key is valid: it must not be refused because
        the JWKS happened to be fetched a moment before the key appeared. So instead of
        skipping the fetch inside the interval, the caller waits for it (once per new
        kid; concurrent callers share one fetch).
        """
        last = self._fetched_at
        if last is not None:
            wait = self.min_refresh_seconds - (time.monotonic() - last)
            if wait > 0:
                await asyncio.sleep(wait)
        await self._refetch(force=False)

    async def _refetch(self, *, force: bool) -> None:
        """Fetch the JWKS, at most every ``jwks_min_refresh_seconds`` unless ``force``.

        Concurrent callers share one fetch (one task, awaited by all of them).
        """
        if self._refresh is None:
            last = self._fetched_at
            if (
                not force
                and last is not None
                and time.monotonic() - last < self.min_refresh_seconds
            ):
                return
            self._fetched_at = time.monotonic()
            self._refresh = asyncio.ensure_future(self._fetch())
        task = self._refresh
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refresh is task:
                self._refresh = None

    async def _fetch(self) -> None:
        assert self.jwks_url is not None
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._http_timeout)
        self.fetch_count += 1
        try:
            response = await self._client.get(self.jwks_url)
            response.raise_for_status()
            self._set_keys(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            # Keep serving with the keys we have; the next unknown kid or expiry retries.
            _log.warning("JWKS fetch from %s failed: %s", self.jwks_url, exc)
            return
        self._loaded_at = time.monotonic()

    def _set_keys(self, doc: Mapping[str, Any]) -> None:
        keys: dict[str, jwt.PyJWK] = {}
        raw: dict[str, Any] = {}
        entries = doc.get("keys")
        if not isinstance(entries, list):
            raise ValueError("a JWKS document needs a 'keys' list")
        for entry in entries:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            if not isinstance(kid, str) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                _log.warning("skipping JWKS key %r: %s", kid, exc)
                continue
            if key.algorithm_name in self.algorithms:  # never an HMAC ("oct") key
                keys[kid] = key
                raw[kid] = entry
        if raw != self._raw:
            # a key was removed or replaced: tokens it verified must be checked again
            self._verified.clear()
        self._keys, self._raw = keys, raw

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _scopes(claims: Mapping[str, Any]) -> frozenset[str] | None:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scopes = claims.get("scopes")
    if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
        return frozenset(scopes)
    return None


class DevTokenIssuer:
    """Mints signed tokens with a fresh key pair. For tests and the dev stack only.

    >>> issuer = DevTokenIssuer()
    >>> verifier = TokenVerifier(issuer=issuer.issuer, audience="ledgerlens",
    ...                          static_jwks=issuer.jwks())
    >>> token = issuer.issue("alice", ["identity.keys.read"], tenant="acme")
    """

    def __init__(
        self,
        *,
        issuer: str = "ledgerlens-identity",
        algorithm: str = "ES256",
        kid: str | None = None,
    ) -> None:
        self.issuer = issuer
        self.algorithm = algorithm
        self.kid = kid or uuid.uuid4().hex[:16]
        self._private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        if algorithm == "ES256":
            self._private = ec.generate_private_key(ec.SECP256R1())
        elif algorithm == "EdDSA":
            self._private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"DevTokenIssuer supports ES256 and EdDSA, not {algorithm}")

    def public_jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.algorithm)
        jwk: dict[str, Any] = algo.to_jwk(self._private.public_key(), as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg=self.algorithm)
        return jwk

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document that verifies this issuer's tokens."""
        return {"keys": [self.public_jwk()]}

    def issue(
        self,
        sub: str,
        scopes: Iterable[str] = (),
        *,
        tenant: str = "dev",
        audience: str = "ledgerlens",
        ttl: float = 300.0,
        issued_at: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        now = time.time() if issued_at is None else issued_at
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": uuid.uuid4().hex,
            "scope": " ".join(scopes),
            TENANT_CLAIM: tenant,
        }
        claims.update(extra_claims or {})
        return jwt.encode(
            claims,
            self._private,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, read only to choose the key and refuse bad algorithms early.

    Hand-written because PyJWT's ``get_unverified_header`` runs the whole token through
    its base64 alphabet check, which costs as much as the signature check itself, and
    ``decode`` runs that check again anyway. Nothing here is trusted: ``decode``
    validates the token in full.
    """
    head, dot, _ = token.partition(".")
    try:
        if not dot or not head:
            raise ValueError("not a compact JWS")
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError) as exc:  # binascii.Error is a ValueError
        raise Unauthenticated("malformed bearer token", reason="TOKEN_MALFORMED") from exc
    return header

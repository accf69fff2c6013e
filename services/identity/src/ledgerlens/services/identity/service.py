"""``IdentityCore``: the identity domain behind one facade, for the gRPC and REST layers.

It returns plain dataclasses and raises ``ledgerlens.runtime.errors`` exceptions; the
API layer maps both to protos and status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.runtime.errors import InvalidArgument, NotFound, Unauthenticated
from ledgerlens.services.identity import metrics
from ledgerlens.services.identity.keys import (
    BAD_CREDENTIALS,
    KEY_ID_PATTERN,
    ApiKeyPage,
    ApiKeyRecord,
    ApiKeys,
    ApiKeyState,
    key_state,
)
from ledgerlens.services.identity.ratelimit import (
    BadSecretThrottle,
    InProcessRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    enforce,
)
from ledgerlens.services.identity.secrets_box import SecretsBox, load_or_create_kek
from ledgerlens.services.identity.settings import Settings
from ledgerlens.services.identity.store import IdentityStore
from ledgerlens.services.identity.tokens import (
    Algorithm,
    Jwks,
    RotationResult,
    SigningKeys,
    TokenIntrospection,
    TokenState,
    introspection,
)

__all__ = [
    "ApiKeyPage",
    "ApiKeyRecord",
    "ApiKeyState",
    "IdentityCore",
    "IssuedToken",
    "Jwks",
    "RotationResult",
    "TokenIntrospection",
    "TokenState",
]

log = logging.getLogger("ledgerlens.services.identity")

#: the longest token accepted by introspection (bytes), as the contract says.
MAX_TOKEN_BYTES = 8192


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: str
    #: seconds until ``expires_at``.
    expires_in: int
    scopes: tuple[str, ...]
    expires_at: datetime
    kid: str
    token_type: str = "Bearer"  # noqa: S105 - the OAuth2 token type

    def __repr__(self) -> str:  # never print the token itself
        return (
            f"IssuedToken(kid={self.kid!r}, scopes={self.scopes!r}, expires_in={self.expires_in})"
        )


class IdentityCore:
    """API keys, tokens, JWKS and rotation, wired from :class:`Settings`."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        redis: Redis | None = None,
        rate_limiter: RateLimiter | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        kek: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.store = IdentityStore(engine)
        self._owned_redis: Redis | None = None
        if rate_limiter is None:
            if redis is None and settings.redis_url:
                redis = self._owned_redis = Redis.from_url(settings.redis_url)
            rate_limiter = (
                RedisRateLimiter(redis)
                if redis is not None
                else InProcessRateLimiter(clock=monotonic)
            )
        self.rate_limiter = rate_limiter
        self.throttle = BadSecretThrottle(
            settings.bad_secret_max_delay_seconds, clock=monotonic, sleep=sleep
        )
        box = SecretsBox(
            kek
            if kek is not None
            else load_or_create_kek(settings.key_encryption_key_file, settings.data_dir)
        )
        self._clock = clock
        self.keys = ApiKeys(self.store, box.api_key_pepper, clock=clock)
        self.signing = SigningKeys(
            self.store,
            box,
            issuer=settings.issuer,
            token_ttl_seconds=settings.token_ttl_seconds,
            default_algorithm=settings.signing_algorithm,
            clock=clock,
        )
        metrics.watch_signing_key(self.signing, settings.signing_key_rotation_days * 86_400)

    async def start(self) -> None:
        """Ensure an active signing key (tables come from the migrations)."""
        await self.signing.ensure_active_key()

    async def close(self) -> None:
        metrics.unwatch_signing_key(self.signing)
        if self._owned_redis is not None:
            await self._owned_redis.aclose()

    # -- API keys -------------------------------------------------------------------------

    async def create_key(
        self,
        tenant_id: str,
        name: str,
        scopes: Sequence[str],
        expires_at: datetime | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        created: tuple[ApiKeyRecord, str] = await self.keys.create_key(
            tenant_id, name, scopes, expires_at
        )
        return created

    async def list_keys(
        self,
        tenant_id: str,
        *,
        include_inactive: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> ApiKeyPage:
        return await self.keys.list_keys(
            tenant_id,
            include_inactive=include_inactive,
            page_size=page_size,
            page_token=page_token,
        )

    async def revoke_key(self, key_id: str, reason: str = "") -> ApiKeyRecord:
        return await self.keys.revoke_key(key_id, reason)

    async def get_key(self, key_id: str) -> ApiKeyRecord:
        """A key's record; ``NotFound`` for an unknown id."""
        found = await self.store.get_api_key(key_id)
        if found is None:
            raise NotFound(
                f"API key {key_id!r} does not exist", resource_type="api_key", resource_name=key_id
            )
        return found[0]

    def key_state(self, record: ApiKeyRecord) -> ApiKeyState:
        return key_state(record, self._clock())

    # -- tokens ---------------------------------------------------------------------------

    async def issue_token(
        self,
        key_id: str,
        secret: str,
        scopes: Sequence[str] = (),
        audience: str = "",
        client_address: str = "",
    ) -> IssuedToken:
        """OAuth2 client credentials: API key in, signed JWT out."""
        s = self.settings
        address = client_address or "unknown"
        # A client_id that is not a key id may be a misplaced secret: it goes into no
        # log line, Redis key or counter.
        bucket_id = key_id if KEY_ID_PATTERN.fullmatch(key_id) else "malformed"
        # Limits first: a limited caller costs no database read or hash.
        await enforce(
            self.rate_limiter,
            f"token:addr:{address}",
            s.token_rate_per_address_per_minute,
            "client address",
        )
        await enforce(
            self.rate_limiter, f"token:key:{bucket_id}", s.token_rate_per_key_per_minute, "API key"
        )
        aud = audience or s.audience
        if aud != s.audience:
            raise InvalidArgument(
                f"unknown audience {audience!r}",
                [("audience", f"must be empty or {s.audience!r}")],
                reason="INVALID_AUDIENCE",
            )
        record = await self.keys.verify_secret(key_id, secret)
        if record is None:
            failures, delay = self.throttle.record_failure(bucket_id, address)
            log.warning(
                "bad client credentials for key id %s from %s (failure %d; delaying %.2fs)",
                bucket_id,
                address,
                failures,
                delay,
            )
            await self.throttle.delay(delay)
            raise Unauthenticated(BAD_CREDENTIALS, reason="BAD_CREDENTIALS")
        self.throttle.record_success(bucket_id, address)
        try:
            self.keys.check_usable(record)
        except Unauthenticated as exc:
            log.warning("refused a token for key %s: %s", key_id, exc.message)
            raise
        granted = self._granted_scopes(record, scopes)
        claims = self.signing.issue_claims(
            subject=record.key_id, tenant_id=record.tenant_id, audience=aud, scopes=granted
        )
        token, kid = await self.signing.sign(claims)
        await self.keys.note_use(record)
        expires_in = claims["exp"] - claims["iat"]
        log.info("issued token %s for key %s (kid %s)", claims["jti"], record.key_id, kid)
        return IssuedToken(
            access_token=token,
            expires_in=expires_in,
            scopes=granted,
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            kid=kid,
        )

    @staticmethod
    def _granted_scopes(record: ApiKeyRecord, requested: Sequence[str]) -> tuple[str, ...]:
        """Empty means all of the key's scopes; otherwise a subset. A scope the key
        lacks is OAuth2 ``invalid_scope``: a bad request, so INVALID_ARGUMENT."""
        if not requested:
            return tuple(record.scopes)
        wanted = tuple(dict.fromkeys(requested))
        missing = [s for s in wanted if s not in record.scopes]
        if missing:
            raise InvalidArgument(
                f"the API key does not hold scope(s): {', '.join(missing)}",
                [("scopes", f"not held by the key: {', '.join(missing)}")],
                reason="INVALID_SCOPE",
            )
        return wanted

    async def jwks(self) -> Jwks:
        return await self.signing.jwks()

    async def rotate(self, algorithm: Algorithm | None = None) -> RotationResult:
        return await self.signing.rotate(algorithm)

    async def introspect(self, token: str) -> TokenIntrospection:
        """Never raises for a bad token: the state says why it is not active."""
        if not token or len(token.encode("utf-8", "ignore")) > MAX_TOKEN_BYTES:
            metrics.INTROSPECTIONS.labels(TokenState.INVALID.value).inc()
            return TokenIntrospection(state=TokenState.INVALID)
        state, claims, kid = await self.signing.read_token(token, [self.settings.audience])
        if state is TokenState.ACTIVE:
            found = await self.store.get_api_key(str(claims.get("sub", "")))
            if found is None:
                state = TokenState.INVALID
            elif found[0].revoked_at is not None:
                state = TokenState.REVOKED
        metrics.INTROSPECTIONS.labels(state.value).inc()
        return introspection(state, claims, kid)

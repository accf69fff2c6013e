"""API keys: create (secret shown once, stored as a keyed hash), list, revoke, authenticate.

A key is ``llk_<16 hex>`` (the non-secret id, also the OAuth2 client_id) plus a secret
``lls_<43 base64url chars>`` (32 random bytes). Only HMAC-SHA256(pepper, secret) is
stored. Slow password hashes (scrypt, argon2) exist to make guessing low-entropy
passwords expensive; a 256-bit random secret cannot be guessed however fast the hash,
so a fast hash costs nothing in security and keeps IssueToken cheap. Keying it with a
pepper derived from the key-encryption key (never in the database) means a leaked
database alone cannot even confirm a candidate secret.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.events.v1 import events_pb2
from ledgerlens.runtime.errors import InvalidArgument, NotFound, Unauthenticated
from ledgerlens.runtime.events import Subjects
from ledgerlens.services.identity import metrics
from ledgerlens.services.identity.store import ApiKeyRecord, IdentityStore

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "KEY_ID_PATTERN",
    "KEY_ID_PREFIX",
    "KNOWN_SCOPES",
    "MAX_PAGE_SIZE",
    "SECRET_PREFIX",
    "ApiKeyPage",
    "ApiKeyRecord",
    "ApiKeyState",
    "ApiKeys",
    "key_state",
]

log = logging.getLogger("ledgerlens.services.identity.keys")

#: the complete v1 scope list, as documented in ledgerlens/options/v1/auth.proto (a
#: test keeps the two equal, and checks every RPC's auth option uses only these).
KNOWN_SCOPES: tuple[str, ...] = (
    "admin",
    "keys:admin",
    "tokens:introspect",
    "certs:enroll",
    "ingest:write",
    "ingest:read",
    "search:read",
    "inference:invoke",
    "usage:read",
    "ledger:submit",
    "ledger:read",
)
KEY_ID_PREFIX = "llk_"
SECRET_PREFIX = "lls_"  # noqa: S105 - the public prefix of every secret
KEY_ID_PATTERN = re.compile(r"llk_[0-9a-f]{16}")
MAX_NAME_LENGTH = 100
MAX_SCOPES = 20
MAX_TENANT_LENGTH = 128
MAX_REASON_LENGTH = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_SECRET_BYTES = 32
#: the one message for an unknown key and a wrong secret (no oracle for probing ids).
BAD_CREDENTIALS = "invalid client credentials"


#: how precisely ``last_used_at`` is kept (see ``ApiKeys.note_use``).
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiKeyState(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


def key_state(record: ApiKeyRecord, now: datetime) -> ApiKeyState:
    if record.revoked_at is not None:
        return ApiKeyState.REVOKED
    if record.expires_at is not None and record.expires_at <= now:
        return ApiKeyState.EXPIRED
    return ApiKeyState.ACTIVE


@dataclass(frozen=True, slots=True)
class ApiKeyPage:
    keys: list[ApiKeyRecord]
    #: empty on the last page.
    next_page_token: str


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


class ApiKeys:
    """The API-key rules over an :class:`IdentityStore`."""

    def __init__(
        self,
        store: IdentityStore,
        pepper: bytes,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if len(pepper) < 32:
            raise ValueError("the API-key pepper must be at least 32 bytes")
        self._store = store
        self._pepper = pepper
        self._clock = clock
        # Hashed for unknown key ids too, so they cost the same as a wrong secret.
        self._dummy_hash = self._hash(secrets.token_urlsafe(_SECRET_BYTES))

    def _hash(self, secret: str) -> bytes:
        mac = crypto_hmac.HMAC(self._pepper, hashes.SHA256())
        mac.update(secret.encode("utf-8"))
        return mac.finalize()

    # -- create -------------------------------------------------------------------------

    async def create_key(
        self,
        tenant_id: str,
        name: str,
        scopes: Sequence[str],
        expires_at: datetime | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """A new key and its secret (returned here only, never stored)."""
        now = self._clock()
        violations: list[tuple[str, str]] = []
        if not tenant_id or len(tenant_id) > MAX_TENANT_LENGTH:
            violations.append(("tenant_id", f"must be 1-{MAX_TENANT_LENGTH} characters"))
        if not name.strip() or len(name) > MAX_NAME_LENGTH:
            violations.append(("name", f"must be 1-{MAX_NAME_LENGTH} characters, not blank"))
        unique_scopes = tuple(dict.fromkeys(scopes))
        if not 1 <= len(unique_scopes) <= MAX_SCOPES:
            violations.append(("scopes", f"must name 1-{MAX_SCOPES} scopes"))
        unknown = [s for s in unique_scopes if s not in KNOWN_SCOPES]
        if unknown:
            violations.append(("scopes", f"unknown scope(s): {', '.join(unknown)}"))
        if expires_at is not None:
            if expires_at.tzinfo is None:
                violations.append(("expires_at", "must carry a timezone"))
            elif expires_at <= now:
                violations.append(("expires_at", "must be in the future"))
        if violations:
            raise InvalidArgument(
                "invalid API key request: " + "; ".join(f"{f}: {d}" for f, d in violations),
                violations,
            )
        secret = SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        record = ApiKeyRecord(
            key_id=KEY_ID_PREFIX + secrets.token_hex(8),
            tenant_id=tenant_id,
            name=name,
            scopes=unique_scopes,
            created_at=now,
            expires_at=expires_at.astimezone(UTC) if expires_at is not None else None,
        )
        await self._store.insert_api_key(record, self._hash(secret))
        metrics.API_KEYS.labels("created").inc()
        log.info("created API key %s for tenant %s", record.key_id, tenant_id)
        return record, secret

    # -- list ---------------------------------------------------------------------------

    @staticmethod
    def _query_hash(tenant_id: str, include_inactive: bool) -> str:
        query = json.dumps([tenant_id, include_inactive]).encode()
        return hashlib.sha256(query).hexdigest()[:16]

    def _encode_page_token(self, query_hash: str, last: ApiKeyRecord) -> str:
        raw = json.dumps([last.created_at.isoformat(), last.key_id, query_hash])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def _decode_page_token(self, token: str, query_hash: str) -> tuple[datetime, str]:
        bad = InvalidArgument("invalid page_token", [("page_token", "not a token from this query")])
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            created, key_id, token_query = json.loads(raw)
            created_at = datetime.fromisoformat(created)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise bad from exc
        if token_query != query_hash or not isinstance(key_id, str) or created_at.tzinfo is None:
            raise bad
        return created_at, key_id

    async def list_keys(
        self,
        tenant_id: str,
        *,
        include_inactive: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> ApiKeyPage:
        """A page of the tenant's keys, newest first."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be 0-{MAX_PAGE_SIZE}",
                [("page_size", f"must be 0-{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})")],
            )
        size = page_size or DEFAULT_PAGE_SIZE
        query_hash = self._query_hash(tenant_id, include_inactive)
        after = self._decode_page_token(page_token, query_hash) if page_token else None
        rows = await self._store.list_api_keys(
            tenant_id,
            active_at=None if include_inactive else self._clock(),
            limit=size + 1,
            after=after,
        )
        keys, more = rows[:size], len(rows) > size
        token = self._encode_page_token(query_hash, keys[-1]) if more else ""
        return ApiKeyPage(keys=keys, next_page_token=token)

    # -- revoke -------------------------------------------------------------------------

    async def revoke_key(self, key_id: str, reason: str = "") -> ApiKeyRecord:
        """Revoke a key and publish ``ApiKeyRevoked`` (via the outbox, same transaction).
        Revoking a revoked key returns it unchanged and publishes nothing."""
        if len(reason) > MAX_REASON_LENGTH:
            raise InvalidArgument(
                "reason is too long", [("reason", f"at most {MAX_REASON_LENGTH} characters")]
            )
        if not key_id:
            raise InvalidArgument("key_id is required", [("key_id", "must not be empty")])
        now = self._clock()
        found = await self._store.get_api_key(key_id)
        if found is None:
            raise NotFound(
                f"API key {key_id} not found", resource_type="api_key", resource_name=key_id
            )
        event = events_pb2.ApiKeyRevoked(
            key_id=key_id,
            tenant_id=found[0].tenant_id,
            reason=reason,
            revoked_at=_timestamp(now),
            occurred_at=_timestamp(now),
        )
        result = await self._store.revoke_api_key(
            key_id,
            reason,
            now,
            event_subject=Subjects.IDENTITY_KEY_REVOKED,
            event=event,
            event_msg_id=f"key-revoked:{key_id}",
        )
        if result is None:
            raise NotFound(
                f"API key {key_id} not found", resource_type="api_key", resource_name=key_id
            )
        record, changed = result
        if changed:
            metrics.API_KEYS.labels("revoked").inc()
            log.info("revoked API key %s of tenant %s", key_id, record.tenant_id)
        return record

    # -- authenticate -------------------------------------------------------------------

    async def verify_secret(self, key_id: str, secret: str) -> ApiKeyRecord | None:
        """The key when ``secret`` is its secret, else ``None`` (unknown key included).
        Says nothing about revocation or expiry."""
        found = await self._store.get_api_key(key_id) if KEY_ID_PATTERN.fullmatch(key_id) else None
        expected = found[1] if found is not None else self._dummy_hash
        matches = hmac.compare_digest(self._hash(secret), expected)
        return found[0] if found is not None and matches else None

    def check_usable(self, record: ApiKeyRecord) -> None:
        """Unauthenticated when the key is revoked or expired (after its secret matched,
        so saying which leaks nothing to someone without the secret)."""
        state = key_state(record, self._clock())
        if state is ApiKeyState.REVOKED:
            raise Unauthenticated("API key is revoked", reason="KEY_REVOKED")
        if state is ApiKeyState.EXPIRED:
            raise Unauthenticated("API key has expired", reason="KEY_EXPIRED")

    async def authenticate(self, key_id: str, secret: str) -> ApiKeyRecord:
        """The key, if the secret matches and it is usable; records ``last_used_at``."""
        record = await self.verify_secret(key_id, secret)
        if record is None:
            raise Unauthenticated(BAD_CREDENTIALS, reason="BAD_CREDENTIALS")
        self.check_usable(record)
        await self.note_use(record)
        return record

    async def note_use(self, record: ApiKeyRecord) -> None:
        """Record ``last_used_at``, to the minute: a write per token request would make
        the hot path of ``IssueToken`` a database write (and SQLite has one writer)."""
        now = self._clock()
        last = record.last_used_at
        if last is None or now - last >= LAST_USED_RESOLUTION:
            await self._store.touch_api_key(record.key_id, now)

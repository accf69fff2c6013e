"""The identity service's domain metrics (``ledgerlens_identity_*``), in one place.

The names are part of the contract with ``infra/grafana`` (the ``ledgerlens-identity``
dashboard) and ``infra/prometheus/rules``: renaming one breaks ``tests/observability``.
Label values are small fixed sets (the tuples below): never a key id, a tenant, a
subject, an enrollment id or a secret.

* tokens issued by grant and transport (``api.py`` for gRPC, ``rest.py`` for HTTP) and
  token requests refused, by reason (:func:`token_failure_reason` maps the domain
  errors to OAuth2-style reasons);
* the IssueToken rate limiter's refusals by scope (``ratelimit.enforce``);
* API keys created and revoked (``keys.py``), signing key rotations (``tokens.py``) and
  the active signing key's age against the rotation period (read at scrape time);
* introspections by result, and CA operations (enroll, revoke, gencrl) by outcome over
  gRPC and Fabric CA's REST.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Literal, Protocol, get_args

from prometheus_client import Counter, Gauge

from ledgerlens.runtime.errors import (
    DomainError,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)

__all__ = [
    "API_KEYS",
    "CA_OPERATIONS",
    "FAILURE_REASONS",
    "INTROSPECTIONS",
    "RATE_LIMITED",
    "SIGNING_KEY_AGE",
    "SIGNING_KEY_ROTATIONS",
    "SIGNING_KEY_ROTATION_PERIOD",
    "TOKENS_ISSUED",
    "TOKEN_FAILURES",
    "ca_operation",
    "record_ca_operation",
    "record_rate_limited",
    "record_token_failure",
    "record_token_issued",
    "token_failure_reason",
    "unwatch_signing_key",
    "watch_signing_key",
]

Grant = Literal["client_credentials"]
GRANTS: tuple[Grant, ...] = get_args(Grant)
Via = Literal["grpc", "http"]
VIAS: tuple[Via, ...] = get_args(Via)
FailureReason = Literal[
    "invalid_client",  # unknown key or wrong secret (one answer for both)
    "revoked",
    "expired",
    "invalid_scope",
    "invalid_audience",
    "rate_limited",
    "invalid_request",  # malformed request (REST form, Basic header, bad field)
    "unsupported_grant_type",
    "error",  # anything else (the RPC histogram's code says which)
]
FAILURE_REASONS: tuple[FailureReason, ...] = get_args(FailureReason)
KeyAction = Literal["created", "revoked"]
LimitScope = Literal["key", "address"]
IntrospectionResult = Literal["active", "expired", "revoked", "invalid"]
CaOperation = Literal["enroll", "revoke", "gencrl"]
CA_OPS: tuple[CaOperation, ...] = get_args(CaOperation)
CaOutcome = Literal["ok", "refused"]

TOKENS_ISSUED = Counter(
    "ledgerlens_identity_tokens_issued_total",
    "Access tokens issued, by OAuth2 grant and transport (grpc: IssueToken, http: "
    "POST /oauth/token).",
    ["grant", "via"],
)
TOKEN_FAILURES = Counter(
    "ledgerlens_identity_token_failures_total",
    "Token requests refused, by reason: invalid_client, revoked, expired, invalid_scope, "
    "invalid_audience, rate_limited, invalid_request, unsupported_grant_type or error.",
    ["reason"],
)
RATE_LIMITED = Counter(
    "ledgerlens_identity_rate_limited_total",
    "Token requests refused by the IssueToken rate limit, by scope (per API key or per "
    "client address).",
    ["scope"],
)
API_KEYS = Counter(
    "ledgerlens_identity_api_keys_total",
    "API keys created, and revoked (a repeated revocation of a revoked key not counted).",
    ["action"],
)
SIGNING_KEY_ROTATIONS = Counter(
    "ledgerlens_identity_signing_key_rotations_total",
    "Signing key rotations done by this replica (RotateSigningKey).",
)
SIGNING_KEY_AGE = Gauge(
    "ledgerlens_identity_signing_key_age_seconds",
    "Age of the active signing key as this replica last read it (it re-reads the active "
    "key at most 10 s before signing); NaN before it has one.",
)
SIGNING_KEY_ROTATION_PERIOD = Gauge(
    "ledgerlens_identity_signing_key_rotation_period_seconds",
    "The rotation policy (setting signing_key_rotation_days): the active signing key "
    "should be rotated before it is this old.",
)
INTROSPECTIONS = Counter(
    "ledgerlens_identity_introspections_total",
    "Introspect calls by the token's state: active, expired, revoked or invalid.",
    ["result"],
)
CA_OPERATIONS = Counter(
    "ledgerlens_identity_ca_operations_total",
    "CA operations over gRPC and Fabric CA REST: enroll, revoke and gencrl (a CRL signed "
    "on request: GetCrl, POST gencrl), ok or refused (a domain error: bad CSR, wrong "
    "secret, not allowed, not found).",
    ["operation", "outcome"],
)

# Known label values start at 0 (Prometheus' advice for bounded labels): rate() and the
# dashboard see a series before its first event instead of "no data".
for _grant in GRANTS:
    for _via in VIAS:
        TOKENS_ISSUED.labels(_grant, _via)
for _reason in FAILURE_REASONS:
    TOKEN_FAILURES.labels(_reason)
for _scope in get_args(LimitScope):
    RATE_LIMITED.labels(_scope)
for _action in get_args(KeyAction):
    API_KEYS.labels(_action)
for _result in get_args(IntrospectionResult):
    INTROSPECTIONS.labels(_result)
for _op in CA_OPS:
    for _outcome in get_args(CaOutcome):
        CA_OPERATIONS.labels(_op, _outcome)

_INVALID_ARGUMENT_REASONS: dict[str, FailureReason] = {
    "INVALID_SCOPE": "invalid_scope",
    "INVALID_AUDIENCE": "invalid_audience",
}
_UNAUTHENTICATED_REASONS: dict[str, FailureReason] = {
    "KEY_REVOKED": "revoked",
    "KEY_EXPIRED": "expired",
}
#: ``ratelimit.enforce``'s ``what`` -> the scope label
_LIMIT_SCOPES: dict[str, LimitScope] = {"API key": "key", "client address": "address"}


def token_failure_reason(error: BaseException) -> FailureReason:
    """The reason label of a refused token request, from the domain error."""
    if isinstance(error, Unauthenticated):
        return _UNAUTHENTICATED_REASONS.get(error.reason or "", "invalid_client")
    if isinstance(error, ResourceExhausted):
        return "rate_limited"
    if isinstance(error, InvalidArgument):
        return _INVALID_ARGUMENT_REASONS.get(error.reason or "", "invalid_request")
    return "error"


def record_token_issued(via: Via, grant: Grant = "client_credentials") -> None:
    TOKENS_ISSUED.labels(grant, via).inc()


def record_token_failure(error: BaseException | FailureReason) -> None:
    """A refused token request: a domain error, or a reason decided by the REST layer."""
    reason = error if isinstance(error, str) else token_failure_reason(error)
    TOKEN_FAILURES.labels(reason).inc()


def record_rate_limited(what: str) -> None:
    RATE_LIMITED.labels(_LIMIT_SCOPES.get(what, "key")).inc()


def record_ca_operation(operation: CaOperation, *, ok: bool) -> None:
    CA_OPERATIONS.labels(operation, "ok" if ok else "refused").inc()


@contextmanager
def ca_operation(
    operation: CaOperation, refusals: tuple[type[BaseException], ...] = (DomainError,)
) -> Iterator[None]:
    """Counts the block as ``ok`` when it ends normally, ``refused`` when it raises one of
    ``refusals``; another error is not counted (the RPC metrics see it)."""
    try:
        yield
    except refusals:
        record_ca_operation(operation, ok=False)
        raise
    record_ca_operation(operation, ok=True)


# -- the active signing key's age, computed at scrape time ---------------------------------


class ActiveKeyClock(Protocol):
    """What the age gauge reads (``tokens.SigningKeys``)."""

    def active_key_activated_at(self) -> datetime | None: ...

    def now(self) -> datetime: ...


#: the watched ``ActiveKeyClock``, held weakly so a stopped service is not kept alive by
#: the registry's callback.
_watched: weakref.ReferenceType[ActiveKeyClock] | None = None


def watch_signing_key(owner: ActiveKeyClock, rotation_period_seconds: float) -> None:
    """Make the age gauge read ``owner``'s active key (the last service started in this
    process wins: one identity per process outside tests)."""
    global _watched
    ref = weakref.ref(owner)
    _watched = ref

    def age() -> float:
        keys = ref()
        activated = keys.active_key_activated_at() if keys is not None else None
        return math.nan if keys is None or activated is None else _seconds(keys, activated)

    SIGNING_KEY_AGE.set_function(age)
    SIGNING_KEY_ROTATION_PERIOD.set(rotation_period_seconds)


def _seconds(keys: ActiveKeyClock, activated: datetime) -> float:
    return (keys.now() - activated).total_seconds()


def unwatch_signing_key(owner: ActiveKeyClock) -> None:
    """``owner`` stopped: the age gauge reads NaN unless another owner took over."""
    global _watched
    if _watched is not None and _watched() is owner:
        _watched = None
        SIGNING_KEY_AGE.set_function(lambda: math.nan)

"""Configuration shared by every service.

Each service subclasses :class:`ServiceSettings` once, in its own ``settings.py``, and
sets its environment prefix, e.g.::

    class Settings(ServiceSettings):
        model_config = service_config("ingestion")   # env LEDGERLENS_INGESTION_*
        max_document_bytes: int = 10_000_000

A setting has one name everywhere: the field ``grpc_port`` of the ingestion service
is the env var ``LEDGERLENS_INGESTION_GRPC_PORT`` and the Helm value
``ingestion.env.LEDGERLENS_INGESTION_GRPC_PORT``.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AuthSettings", "ServiceSettings", "service_config"]


def service_config(service: str) -> SettingsConfigDict:
    """The pydantic-settings config of one service: env prefix ``LEDGERLENS_<SVC>_``."""
    return SettingsConfigDict(
        env_prefix=f"LEDGERLENS_{service.upper()}_",
        env_nested_delimiter="__",
        extra="ignore",
    )


class AuthSettings(BaseSettings):
    """How a service verifies the bearer JWTs that identity issues."""

    model_config = SettingsConfigDict(extra="ignore")

    #: ``false`` only for tests and tools; a deployed service always verifies tokens.
    enabled: bool = True
    #: identity's JWKS endpoint, e.g. ``http://identity:8080/.well-known/jwks.json``.
    jwks_url: str | None = None
    #: how long a fetched JWKS is trusted before it is fetched again (seconds).
    jwks_cache_seconds: float = Field(default=300.0, gt=0)
    #: an unknown ``kid`` triggers a refetch, at most this often (seconds); a token with
    #: a new kid waits out the rest of the interval rather than being refused.
    jwks_min_refresh_seconds: float = Field(default=1.0, ge=0)
    #: static public keys (a JWKS JSON document) used instead of ``jwks_url`` (tests).
    static_jwks: str | None = None
    issuer: str = "ledgerlens-identity"
    audience: str = "ledgerlens"
    #: accepted signature algorithms; never ``none`` and never an HMAC algorithm.
    algorithms: list[str] = Field(default_factory=lambda: ["ES256", "EdDSA"])
    #: clock skew tolerated on ``exp``/``nbf``/``iat`` (seconds).
    leeway_seconds: float = Field(default=30.0, ge=0)


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclass with ``model_config = service_config(name)``."""

    model_config = service_config("service")

    #: the service's name, as in metrics labels, logs and traces.
    service_name: str = "service"
    host: str = "127.0.0.1"
    #: gRPC port (0 picks a free port, for tests).
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    #: ops HTTP port: /healthz, /readyz, /metrics and the REST facade.
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: largest request or response message accepted (bytes).
    max_message_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    #: server keepalive ping interval and ping-ack timeout (seconds).
    keepalive_time_seconds: float = Field(default=30.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=10.0, gt=0)
    #: on SIGTERM, in-flight calls get this long to finish before they are cancelled.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    #: JetStream server(s), comma separated.
    nats_url: str = "nats://127.0.0.1:4222"
    #: how often the service reads its consumers' JetStream state (pending, ack pending,
    #: redelivered, dead letters) into its /metrics gauges (seconds).
    events_state_interval_seconds: float = Field(default=15.0, gt=0)
    #: SQLAlchemy async URL of the service's relational store.
    database_url: str = "sqlite+aiosqlite:///.data/service.db"
    redis_url: str | None = None
    #: how long the outbox relay keeps a published row (seconds; JetStream holds the event
    #: itself): pruned hourly, so the outbox table does not grow forever. Unset: keep all.
    outbox_keep_published_seconds: float | None = Field(default=7 * 24 * 3600.0, ge=0)
    #: where the service keeps local files (embedded index, dev ledger, caches).
    data_dir: str = ".data"
    log_level: str = "INFO"
    #: OTLP/gRPC endpoint for traces (e.g. ``http://otel-collector:4317``); off when unset.
    otlp_endpoint: str | None = None
    #: fraction of root traces sampled (0..1) when tracing is on.
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)
    #: a token for calls this service makes on its own behalf (service-to-service).
    #: A static token wins over the client credentials below; identity's tokens are
    #: short-lived, so a deployed service should use client credentials instead.
    service_token: SecretStr | None = None
    #: the service's own API key (client credentials grant): with ``service_token_url``
    #: the service fetches its token from identity, caches it until shortly before it
    #: expires and fetches a new one (``make up`` provisions these for a service whose
    #: registry entry declares ``service_scopes``).
    service_client_id: str | None = None
    service_client_secret: SecretStr | None = None
    #: identity's OAuth2 token endpoint, e.g. ``http://identity:8081/oauth/token``.
    service_token_url: str | None = None

"""The identity service's settings (env prefix ``LEDGERLENS_IDENTITY_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ledgerlens.runtime.settings import ServiceSettings, service_config


class Settings(ServiceSettings):
    model_config = service_config("identity")

    service_name: str = "identity"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_port: int = Field(default=8081, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///.data/identity.db"
    #: the key-encryption key and the dev CA live here (what `make up` uses too, so
    #: `python -m ledgerlens.services.identity create-key` from the repo root matches it)
    data_dir: str = ".data/identity"

    #: ``iss`` of every token, and the ``aud`` tokens are issued for.
    issuer: str = "ledgerlens-identity"
    audience: str = "ledgerlens"
    #: lifetime of an issued token (seconds).
    token_ttl_seconds: int = Field(default=900, ge=60, le=86_400)
    #: signature algorithm of new signing keys.
    signing_algorithm: Literal["ES256", "EdDSA"] = "ES256"
    #: the rotation policy (days): exposed as a metric for the dashboard and the
    #: LedgerlensIdentitySigningKeyOverdue alert; nothing rotates automatically.
    signing_key_rotation_days: int = Field(default=90, ge=1, le=3650)
    #: a file holding the key that encrypts signing keys at rest (32 random bytes,
    #: base64url, as a Kubernetes Secret mounts it); created under ``data_dir`` when unset.
    key_encryption_key_file: str | None = None
    #: the CA's certificate and private key (PEM files, e.g. a mounted Secret); a
    #: self-signed dev CA is created under ``data_dir`` when unset.
    ca_cert_file: str | None = None
    ca_key_file: str | None = None
    #: the MSP id written into enrolled identities' context.
    ca_name: str = "ledgerlens-ca"
    #: lifetime of enrolled certificates (days).
    certificate_days: int = Field(default=365, ge=1, le=3650)

    #: IssueToken limits, per API key and per client address (requests per minute).
    token_rate_per_key_per_minute: int = Field(default=60, ge=1)
    token_rate_per_address_per_minute: int = Field(default=300, ge=1)
    #: how long to hold back an answer after repeated bad secrets (seconds, at most).
    bad_secret_max_delay_seconds: float = Field(default=2.0, ge=0)

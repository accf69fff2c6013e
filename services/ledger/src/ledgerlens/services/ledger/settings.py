"""The ledger service's settings (env prefix ``LEDGERLENS_LEDGER_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ledgerlens.runtime.settings import ServiceSettings, service_config

__all__ = ["DevLedgerSettings", "FabricSettings", "Settings"]


class FabricSettings(BaseModel):
    """A real Fabric network, through its Gateway peer (``backend = "fabric"``).

    The identity is an X.509 certificate and its ECDSA P-256 key, enrolled with the
    organisation's CA (Fabric CA, or the identity service's ``EnrollCertificate``).
    """

    #: the Gateway peer, ``host:port`` (e.g. ``peer0.org1.example.com:7051``).
    peer_address: str = ""
    msp_id: str = ""
    #: PEM files of the enrolled identity.
    certificate_path: str = ""
    private_key_path: str = ""
    #: the peer organisation's TLS CA (PEM file); unset means plaintext (dev only).
    tls_root_certificates_path: str | None = None
    #: for mutual TLS: this client's TLS certificate and key (PEM files).
    tls_client_certificate_path: str | None = None
    tls_client_key_path: str | None = None
    #: when the peer's certificate names another host than ``peer_address``.
    tls_server_name_override: str | None = None
    #: per-phase deadlines, seconds.
    evaluate_timeout_seconds: float = Field(default=5.0, gt=0)
    endorse_timeout_seconds: float = Field(default=15.0, gt=0)
    submit_timeout_seconds: float = Field(default=5.0, gt=0)
    commit_timeout_seconds: float = Field(default=60.0, gt=0)
    #: attempts of a transaction invalidated by a retryable code (MVCC_READ_CONFLICT …).
    max_attempts: int = Field(default=3, ge=1, le=10)


class DevLedgerSettings(BaseModel):
    """The embedded dev ledger (``backend = "dev"``): hash-chained blocks in the
    service's database, the same contract and semantics as on Fabric."""

    #: the most transactions ordered into one block.
    max_block_transactions: int = Field(default=100, ge=1, le=10_000)
    #: how long the orderer waits for more transactions before cutting a block.
    block_linger_seconds: float = Field(default=0.02, ge=0, le=5)
    #: how late a waiter notices a block another process committed (this process's
    #: own commits wake waiters at once).
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    #: rounds of a transaction invalidated by MVCC_READ_CONFLICT / PHANTOM_READ_CONFLICT.
    max_attempts: int = Field(default=3, ge=1, le=10)
    #: how long a submit waits for its block.
    commit_timeout_seconds: float = Field(default=30.0, gt=0)


class Settings(ServiceSettings):
    model_config = service_config("ledger")

    service_name: str = "ledger"
    grpc_port: int = Field(default=50055, ge=0, le=65535)
    http_port: int = Field(default=8085, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///.data/ledger.db"
    data_dir: str = ".data/ledger"

    #: ``dev`` (the embedded dev ledger, the default) or ``fabric``.
    backend: Literal["dev", "fabric"] = "dev"
    dev: DevLedgerSettings = Field(default_factory=DevLedgerSettings)
    fabric: FabricSettings = Field(default_factory=FabricSettings)
    #: the channel and chaincode requests without one use.
    channel: str = Field(default="ledgerlens", pattern=r"^[a-z][a-z0-9.-]{0,248}$")
    chaincode: str = Field(default="anchoring", pattern=r"^[A-Za-z0-9_.+-]{1,128}$")

    #: anchors from events are batched: at most this many per transaction …
    anchor_batch_size: int = Field(default=64, ge=1, le=1000)
    #: … collected for at most this long.
    anchor_batch_linger_seconds: float = Field(default=0.05, ge=0, le=5)
    #: ``ingestion.document.ingested`` events handled at once (each waits for its
    #: batch's commit before it is acked, so this bounds how full a batch can get).
    anchor_consumer_concurrency: int = Field(default=16, ge=1, le=256)
    #: when the event follower has no checkpoint yet, it starts at this block (0: the
    #: whole chain; a Fabric channel with a long history may start later).
    follow_from_block: int = Field(default=0, ge=0)

"""The ingestion service's settings (env prefix ``LEDGERLENS_INGESTION_``)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from ledgerlens.embedding import EmbeddingSettings
from ledgerlens.runtime.settings import ServiceSettings, service_config


class Settings(ServiceSettings):
    model_config = service_config("ingestion")

    service_name: str = "ingestion"
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    http_port: int = Field(default=8082, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///.data/ingestion.db"
    data_dir: str = ".data/ingestion"

    #: the largest document accepted (bytes of raw content); larger is INVALID_ARGUMENT.
    max_document_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    #: the largest gRPC message: a document at the limit plus its metadata must fit.
    max_message_bytes: int = Field(default=24 * 1024 * 1024, gt=0)
    #: the most tokens (of the embedding model's tokenizer) in one chunk, and how many
    #: tokens consecutive chunks of one section share.
    chunk_max_tokens: int = Field(default=200, ge=16)
    chunk_overlap_tokens: int = Field(default=32, ge=0)
    #: documents of one IngestStream processed at once (their chunks share embedding
    #: batches, which is what keeps the model busy).
    stream_concurrency: int = Field(default=8, ge=1, le=256)
    #: chunks per ``ingestion.chunks.embedded`` event, at most (each event also stays
    #: under ``event_max_bytes``).
    event_max_chunks: int = Field(default=64, ge=1)
    #: bytes per event payload, at most (NATS' default max payload is 1 MiB).
    event_max_bytes: int = Field(default=900 * 1024, ge=64 * 1024)

    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)

    @model_validator(mode="after")
    def _check_chunking(self) -> Self:
        if self.max_message_bytes < self.max_document_bytes + 64 * 1024:
            raise ValueError("max_message_bytes must exceed max_document_bytes by 64 KiB")
        if self.chunk_overlap_tokens >= self.chunk_max_tokens // 2:
            raise ValueError("chunk_overlap_tokens must be less than half of chunk_max_tokens")
        return self

"""The retrieval service's settings (env prefix ``LEDGERLENS_RETRIEVAL_``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, Field, SecretStr, model_validator

from ledgerlens.embedding import EmbeddingSettings
from ledgerlens.runtime.settings import ServiceSettings, service_config


class LocalIndexSettings(BaseModel):
    """The embedded index: HNSW (usearch) over the vectors, kept in ``data_dir``."""

    #: HNSW graph degree and beam widths (usearch's connectivity/expansion).
    connectivity: int = Field(default=16, ge=4, le=128)
    expansion_add: int = Field(default=128, ge=8)
    expansion_search: int = Field(default=96, ge=8)
    #: the precision of the vectors inside the graph. ``i8`` (the default) quantises
    #: each unit vector to bytes: a quarter of the memory and distances about three
    #: times cheaper than ``f32``. The graph only proposes candidates; they are scored
    #: again exactly against the float32 vectors, so scores and order are exact.
    graph_dtype: Literal["f32", "f16", "i8"] = "i8"
    #: a filter that leaves at most this many chunks is answered exactly (a scan of
    #: just those vectors); above it, the graph is searched and filtered.
    exact_threshold: int = Field(default=2048, ge=0)
    #: above that, a search for fusion candidates walks the graph for at most this many
    #: results (or what finding ``top_k`` survivors needs, if more): a filter passing a
    #: fifth of the chunks would otherwise cost a walk five times the candidates' size.
    max_graph_candidates: int = Field(default=256, ge=16)
    #: the graph is written to disk after this many seconds with changes (and at stop).
    snapshot_interval_seconds: float = Field(default=60.0, gt=0)


class QdrantSettings(BaseModel):
    """Qdrant, the backend for scale: a server/cluster (``url``) or local mode (``path``)."""

    #: e.g. ``http://qdrant:6333``; unset: local mode in ``data_dir/qdrant`` (or ``path``).
    url: str | None = None
    path: str | None = None
    api_key: SecretStr | None = None
    collection: str = "ledgerlens_chunks"
    timeout_seconds: float = Field(default=10.0, gt=0)
    #: prefer gRPC to REST when talking to a server.
    prefer_grpc: bool = False


class Settings(ServiceSettings):
    model_config = service_config("retrieval")

    service_name: str = "retrieval"
    grpc_port: int = Field(default=50053, ge=0, le=65535)
    http_port: int = Field(default=8083, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///.data/retrieval.db"
    data_dir: str = ".data/retrieval"

    #: where dense vectors and chunks live: ``local`` (embedded HNSW, the default) or
    #: ``qdrant``.
    backend: Literal["local", "qdrant"] = "local"
    local: LocalIndexSettings = Field(default_factory=LocalIndexSettings)
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings)

    #: this replica's name; each replica keeps its own index and so its own durable
    #: consumers (``retrieval-<replica>--…``). Empty: the platform's consumer names.
    #: A DNS label, so a Kubernetes pod name fits (the chart sets it to the pod's name).
    replica: str = Field(default="", pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)?$")
    #: a replica's durables are deleted by the server after this many seconds without
    #: a pull (a replaced pod never comes back for them). Not applied to the platform's
    #: consumer names (``replica`` empty), which are kept forever.
    replica_consumer_idle_seconds: float = Field(default=3600.0, gt=0)

    #: the most results one search returns (``top_k`` above it is INVALID_ARGUMENT).
    max_top_k: int = Field(default=100, ge=1, le=1000)
    #: results when the request's ``top_k`` is 0.
    default_top_k: int = Field(default=10, ge=1)
    #: candidates taken from each ranking (dense, keyword) before fusion; a search takes
    #: max(candidates, top_k) from each.
    candidates: int = Field(default=50, ge=1, le=2000)
    #: reciprocal-rank fusion constant: score = sum 1 / (rrf_k + rank).
    rrf_k: int = Field(default=60, ge=1)
    #: searches in one BatchSearch, at most.
    max_batch: int = Field(default=64, ge=1, le=1024)
    #: query length in characters (after trimming), at most.
    max_query_chars: int = Field(default=2000, ge=1)
    #: values in one repeated filter field, at most.
    max_filter_values: int = Field(default=100, ge=1)
    #: query vectors kept in memory (by model and query text); 0 turns the cache off.
    query_cache_size: int = Field(default=10_000, ge=0)

    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        if self.default_top_k > self.max_top_k:
            raise ValueError("default_top_k must not exceed max_top_k")
        return self

"""How a service chooses and configures its embedder.

Nest it in the service's settings so both sides read the same names::

    class Settings(ServiceSettings):
        model_config = service_config("ingestion")
        embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)

gives ``LEDGERLENS_INGESTION_EMBEDDING__PROVIDER``, ``..._EMBEDDING__BASE_URL`` and so on.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    SecretStr,
    TypeAdapter,
    model_validator,
)

__all__ = ["DEFAULT_DIMENSIONS", "DEFAULT_MAX_TOKENS", "DEFAULT_MODEL", "EmbeddingSettings"]

#: the model bundled for the local provider
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DIMENSIONS = 384
#: all-MiniLM-L6-v2 reads 256 tokens, two of which are [CLS] and [SEP]
DEFAULT_MAX_TOKENS = 254

_HTTP_URL = TypeAdapter(AnyHttpUrl)


def _http_url(value: str) -> str:
    # pydantic adds a slash to a bare host; without it, "{base_url}/embeddings" reads well
    return str(_HTTP_URL.validate_python(value)).rstrip("/")


class EmbeddingSettings(BaseModel):
    """Which embedder a service uses; see the README for each field's env name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``local``: the bundled model in this process; ``openai``: an OpenAI-compatible
    #: ``/embeddings`` endpoint (text-embeddings-inference, vLLM, OpenAI).
    provider: Literal["local", "openai"] = "local"
    #: the model's name, recorded with every vector and sent to the server.
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    #: texts per forward pass (local) or per request (openai); 32 is TEI's default cap.
    batch_size: int = Field(default=32, gt=0)
    #: the server's API root including ``/v1``, e.g. ``http://tei:80/v1`` (openai only).
    base_url: Annotated[str, AfterValidator(_http_url)] | None = None
    #: sent as ``Authorization: Bearer ...`` when set (openai only).
    api_key: SecretStr | None = None
    #: vector length; a model or server that returns another length is an error.
    dimensions: int = Field(default=DEFAULT_DIMENSIONS, gt=0)
    #: the most tokens of one text the model reads (no special tokens); the local
    #: provider defaults to its model's, openai to all-MiniLM-L6-v2's (254).
    max_tokens: int | None = Field(default=None, gt=0)
    #: a ``tokenizer.json`` matching the remote model (openai; default: MiniLM's).
    tokenizer_path: FilePath | None = None
    #: a sentence-transformers model directory for the local provider (default: the
    #: bundled all-MiniLM-L6-v2).
    model_path: DirectoryPath | None = None
    #: per HTTP request (openai).
    timeout_seconds: float = Field(default=30.0, gt=0)
    #: retries after the first attempt on 429, 5xx and connection errors (openai).
    max_retries: int = Field(default=4, ge=0)
    #: first backoff between retries; it doubles, with jitter, up to 30 s (openai).
    retry_backoff_seconds: float = Field(default=0.5, gt=0)
    #: torch intra-op threads for the local provider (default: torch's own choice).
    torch_threads: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_provider(self) -> Self:
        if self.provider == "openai":
            if self.base_url is None:
                raise ValueError(
                    "embedding provider 'openai' needs base_url "
                    "(the API root including /v1, e.g. http://text-embeddings-inference:80/v1)"
                )
            if self.model != DEFAULT_MODEL and (
                self.tokenizer_path is None or self.max_tokens is None
            ):
                raise ValueError(
                    f"embedding model {self.model!r} is not {DEFAULT_MODEL}: set tokenizer_path "
                    "(its tokenizer.json) and max_tokens, or chunks are measured with the "
                    "wrong tokenizer"
                )
        elif self.model != DEFAULT_MODEL and self.model_path is None:
            raise ValueError(
                f"the local provider bundles only {DEFAULT_MODEL}; set model_path to a "
                f"sentence-transformers directory for {self.model!r}"
            )
        return self

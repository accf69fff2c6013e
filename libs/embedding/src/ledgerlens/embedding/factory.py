"""One call that turns :class:`EmbeddingSettings` into a ready :class:`Embedder`."""

from __future__ import annotations

from ledgerlens.embedding.base import Embedder
from ledgerlens.embedding.local import LocalEmbedder
from ledgerlens.embedding.remote import OpenAIEmbedder
from ledgerlens.embedding.settings import DEFAULT_MAX_TOKENS, EmbeddingSettings
from ledgerlens.embedding.tokenizer import HFTokenizer

__all__ = ["create_embedder"]


async def create_embedder(settings: EmbeddingSettings) -> Embedder:
    """The embedder ``settings`` describe; the local model is loaded before this returns
    (seconds), off the event loop. Close it with ``await embedder.aclose()``."""
    if settings.provider == "local":
        return await LocalEmbedder.create(
            model_path=settings.model_path,
            name=settings.model,
            batch_size=settings.batch_size,
            dimensions=settings.dimensions,
            max_tokens=settings.max_tokens,
            torch_threads=settings.torch_threads,
        )
    base_url = settings.base_url
    # EmbeddingSettings refuses openai without base_url; this guards a model_construct().
    if base_url is None:
        raise ValueError("embedding provider 'openai' needs base_url")
    tokenizer = (
        HFTokenizer.from_file(settings.tokenizer_path)
        if settings.tokenizer_path is not None
        else HFTokenizer.default()
    )
    return OpenAIEmbedder(
        base_url=base_url,
        model=settings.model,
        dimensions=settings.dimensions,
        max_tokens=settings.max_tokens or DEFAULT_MAX_TOKENS,
        tokenizer=tokenizer,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        batch_size=settings.batch_size,
        timeout_seconds=settings.timeout_seconds,
        max_retries=settings.max_retries,
        retry_backoff_seconds=settings.retry_backoff_seconds,
    )

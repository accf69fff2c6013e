"""Providers behind one interface (:class:`Provider`), built from configuration."""

from __future__ import annotations

from collections.abc import Sequence

from ledgerlens.embedding import Embedder
from ledgerlens.services.inference.providers.base import Provider
from ledgerlens.services.inference.providers.config import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBED_MODEL,
    GatewayConfig,
    ModelPrice,
    ProviderConfig,
    RouterConfig,
    check_references,
    default_providers,
)
from ledgerlens.services.inference.providers.extractive import (
    NO_ANSWER,
    ExtractiveAnswer,
    ExtractiveProvider,
    Quote,
    answer_from_passages,
    format_passages,
    parse_passages,
    question_of,
)
from ledgerlens.services.inference.providers.openai_compat import (
    OpenAICompatProvider,
    parse_retry_after,
)

__all__ = [
    "DEFAULT_CHAT_MODEL",
    "DEFAULT_EMBED_MODEL",
    "NO_ANSWER",
    "ExtractiveAnswer",
    "ExtractiveProvider",
    "GatewayConfig",
    "ModelPrice",
    "OpenAICompatProvider",
    "Provider",
    "ProviderConfig",
    "Quote",
    "RouterConfig",
    "answer_from_passages",
    "build_providers",
    "check_references",
    "create_provider",
    "default_providers",
    "format_passages",
    "parse_passages",
    "parse_retry_after",
    "question_of",
]


def create_provider(config: ProviderConfig, *, embedder: Embedder | None = None) -> Provider:
    """The provider ``config`` describes. ``embedder`` (extractive only) is the shared
    local embedder if the service already has one; otherwise it is loaded on first use."""
    if config.kind == "extractive":
        return ExtractiveProvider.from_config(config, embedder=embedder)
    return OpenAICompatProvider(config)


def build_providers(
    configs: Sequence[ProviderConfig], *, embedder: Embedder | None = None
) -> dict[str, Provider]:
    """name -> provider for every config (close each with ``await p.aclose()``)."""
    return {c.name: create_provider(c, embedder=embedder) for c in configs}

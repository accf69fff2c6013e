"""ledgerlens.embedding: how ingestion embeds chunks and retrieval embeds queries, once.

Importing this package is cheap: torch and sentence-transformers load only when a
local embedder is created.
"""

from ledgerlens.embedding.base import Embedder, EmbeddingError, Tokenizer
from ledgerlens.embedding.factory import create_embedder
from ledgerlens.embedding.local import LocalEmbedder
from ledgerlens.embedding.remote import OpenAIEmbedder
from ledgerlens.embedding.settings import (
    DEFAULT_DIMENSIONS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    EmbeddingSettings,
)
from ledgerlens.embedding.tokenizer import HFTokenizer, default_model_path, default_tokenizer_path

__all__ = [
    "DEFAULT_DIMENSIONS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MODEL",
    "Embedder",
    "EmbeddingError",
    "EmbeddingSettings",
    "HFTokenizer",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "Tokenizer",
    "create_embedder",
    "default_model_path",
    "default_tokenizer_path",
]

"""all-MiniLM-L6-v2 (or another sentence-transformers model) in this process, on CPU."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ledgerlens.embedding.base import EmbeddingError, Tokenizer
from ledgerlens.embedding.settings import DEFAULT_MODEL
from ledgerlens.embedding.tokenizer import HFTokenizer, default_model_path

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["LocalEmbedder"]

# The model, its tokenizer and (through sentence-transformers) transformers read these;
# a pod must never reach for the Hugging Face Hub, not even to check for an update.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_SPECIAL_TOKENS = 2  # [CLS] and [SEP]


def _load_model(path: Path, torch_threads: int | None) -> SentenceTransformer:
    os.environ.update(_OFFLINE_ENV)
    # Imported here, not at module level: torch and transformers take seconds to import,
    # and a service on the openai provider should not pay for them.
    import torch
    from sentence_transformers import SentenceTransformer

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    # local_files_only as well as the env: huggingface_hub reads the env once at import,
    # which may have happened before this function ran.
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


class LocalEmbedder:
    """Embeds with a sentence-transformers model in one dedicated worker thread.

    Every forward pass runs on that thread, so the event loop never blocks and passes
    never compete for torch's thread pool. The executor is not tied to an event loop:
    one instance serves any loop (a session-wide test fixture, several services' loops).

    Build it with :meth:`create` (async) or :meth:`load` (blocking); both load once.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        executor: ThreadPoolExecutor,
        *,
        name: str = DEFAULT_MODEL,
        batch_size: int = 32,
        dimensions: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        model_dimensions = model.get_embedding_dimension()
        if model_dimensions is None:
            raise EmbeddingError(f"model {name!r} does not say its vector length")
        if dimensions is not None and dimensions != model_dimensions:
            raise EmbeddingError(
                f"model {name!r} makes {model_dimensions}-dimensional vectors, "
                f"configured dimensions is {dimensions}"
            )
        if model.max_seq_length is None:
            raise EmbeddingError(f"model {name!r} does not say how many tokens it reads")
        model_max_tokens = model.max_seq_length - _SPECIAL_TOKENS
        if max_tokens is not None and max_tokens > model_max_tokens:
            raise EmbeddingError(
                f"max_tokens {max_tokens} is more than model {name!r} reads ({model_max_tokens})"
            )
        self._model = model
        self._executor = executor
        self._closed = False
        self.model = name
        self.dimensions = model_dimensions
        self.max_tokens = max_tokens or model_max_tokens
        self.batch_size = batch_size
        # Built from the model's own tokenizer, so chunk token counts are exactly what
        # the model sees.
        self.tokenizer: Tokenizer = HFTokenizer(model.tokenizer.backend_tokenizer)

    @classmethod
    def load(
        cls,
        *,
        model_path: str | Path | None = None,
        name: str = DEFAULT_MODEL,
        batch_size: int = 32,
        dimensions: int | None = None,
        max_tokens: int | None = None,
        torch_threads: int | None = None,
    ) -> LocalEmbedder:
        """Load the model, blocking the caller for the seconds that takes.

        For synchronous set-up (a session-wide test fixture); services use :meth:`create`.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = Path(model_path) if model_path is not None else default_model_path()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledgerlens-embedding")
        try:
            # On the worker thread, like every later use of the model.
            model = executor.submit(_load_model, path, torch_threads).result()
            return cls(
                model,
                executor,
                name=name,
                batch_size=batch_size,
                dimensions=dimensions,
                max_tokens=max_tokens,
            )
        except EmbeddingError:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        except Exception as exc:
            executor.shutdown(wait=False, cancel_futures=True)
            raise EmbeddingError(f"could not load embedding model from {path}: {exc}") from exc

    @classmethod
    async def create(
        cls,
        *,
        model_path: str | Path | None = None,
        name: str = DEFAULT_MODEL,
        batch_size: int = 32,
        dimensions: int | None = None,
        max_tokens: int | None = None,
        torch_threads: int | None = None,
    ) -> LocalEmbedder:
        """:meth:`load` without blocking the event loop."""
        return await asyncio.to_thread(
            cls.load,
            model_path=model_path,
            name=name,
            batch_size=batch_size,
            dimensions=dimensions,
            max_tokens=max_tokens,
            torch_threads=torch_threads,
        )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one str")
        if not texts:
            return []
        if self._closed:
            raise EmbeddingError("the embedder is closed")
        # Longest first, so each batch holds texts of similar length and pads little
        # (sentence-transformers does the same within one encode call).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        vectors: list[list[float]] = [[] for _ in texts]
        loop = asyncio.get_running_loop()
        # One executor job per batch: concurrent callers (a query while a document is
        # being ingested) interleave instead of waiting for a whole document.
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = [texts[i] for i in indices]
            try:
                encoded = await loop.run_in_executor(self._executor, self._encode, batch)
            except EmbeddingError:
                raise
            except Exception as exc:
                raise EmbeddingError(f"local embedding with {self.model!r} failed: {exc}") from exc
            for i, vector in zip(indices, encoded, strict=True):
                vectors[i] = vector
        return vectors

    def _encode(self, batch: list[str]) -> list[list[float]]:
        array = self._model.encode(
            batch,
            batch_size=len(batch),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        if array.shape != (len(batch), self.dimensions):
            raise EmbeddingError(
                f"model {self.model!r} returned shape {array.shape} "
                f"for {len(batch)} texts of {self.dimensions} dimensions"
            )
        result: list[list[float]] = array.tolist()
        return result

    def close(self) -> None:
        """Stop the worker thread, waiting for a running batch to finish."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

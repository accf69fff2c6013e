"""Document metadata: the domain twin of ``common.v1.DocumentMetadata``.

Metadata reaches ingestion two ways: from the request, and from the document's own
YAML front matter (EIP style). :func:`from_front_matter` maps the latter,
:func:`merge` lets the request win, and :func:`validate` enforces the contract's
limits and normalises (lower-case chain and tags, EIP-55 checksummed addresses, UTC
times) so that what is stored compares and filters predictably.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

from eth_utils.address import to_checksum_address

from ledgerlens.runtime.errors import InvalidArgument

__all__ = [
    "MAX_ADDRESSES",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_VALUE_CHARS",
    "MAX_AUTHORS",
    "MAX_AUTHOR_CHARS",
    "MAX_CHAIN_CHARS",
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "MAX_TITLE_CHARS",
    "DocType",
    "Metadata",
    "from_front_matter",
    "guess_doc_type",
    "merge",
    "split_authors",
    "validate",
]

# Limits of common.v1.DocumentMetadata (see its field comments).
MAX_CHAIN_CHARS = 64
MAX_ADDRESSES = 100
MAX_AUTHORS = 100
MAX_AUTHOR_CHARS = 256
MAX_TAGS = 50
MAX_TAG_CHARS = 64
MAX_TITLE_CHARS = 512
MAX_ATTRIBUTES = 50
MAX_ATTRIBUTE_VALUE_CHARS = 1024


class DocType(enum.StrEnum):
    """``common.v1.DocType`` without UNSPECIFIED (that is ``None`` on :class:`Metadata`)."""

    WHITEPAPER = "whitepaper"
    EIP = "eip"
    GITHUB = "github"
    FORUM = "forum"
    ONCHAIN_EVENT = "onchain_event"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Metadata:
    """What is known about a document. Empty values mean "not set" (as in proto3);
    ``doc_type=None`` is DOC_TYPE_UNSPECIFIED."""

    doc_type: DocType | None = None
    chain: str = ""
    contract_addresses: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    published_at: datetime | None = None
    tags: tuple[str, ...] = ()
    title: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


# Front-matter keys mapped to dedicated fields; every other scalar key goes to attributes.
_AUTHOR_KEYS = ("author", "authors")
# EIPs say `created`; Jekyll/Hugo-style front matter says `date`.
_DATE_KEYS = ("created", "date")
_TAG_SOURCE_KEYS = ("category", "type", "status")
_CONSUMED_KEYS = frozenset({"title", "tags", *_AUTHOR_KEYS, *_DATE_KEYS})

_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
_NON_SLUG_RE = re.compile(r"[^a-z0-9]+")


def from_front_matter(mapping: Mapping[Any, Any], *, field_prefix: str = "metadata") -> Metadata:
    """Map parsed YAML front matter (EIP style) to :class:`Metadata`.

    ``title`` -> title; ``author``/``authors`` -> authors; ``created`` (or ``date``) ->
    published_at at midnight UTC; an ``eip`` key makes it an EIP about Ethereum;
    ``category``/``type``/``status`` (slugified) plus ``tags`` -> tags; every other
    scalar key (and lists of scalars, comma-joined) -> attributes as strings.
    Limits are left to :func:`validate`, which runs on the merged result.

    Raises :class:`InvalidArgument` (field ``<field_prefix>.published_at``) for a date
    that cannot be parsed.
    """
    fm = {str(k): v for k, v in mapping.items()}

    authors: list[str] = []
    for key in _AUTHOR_KEYS:
        value = fm.get(key)
        if isinstance(value, str):
            authors.extend(split_authors(value))
        elif isinstance(value, list):
            authors.extend(str(a).strip() for a in value if _is_scalar(a) and str(a).strip())

    published_at = None
    for key in _DATE_KEYS:
        if fm.get(key) is not None:
            published_at = _parse_date(fm[key], f"{field_prefix}.published_at", key)
            break

    tags: list[str] = []
    for key in _TAG_SOURCE_KEYS:
        if _is_scalar(fm.get(key)):
            tags.append(_slug(_attribute_text(fm[key])))
    explicit_tags = fm.get("tags")
    if isinstance(explicit_tags, str):
        tags.extend(_slug(t) for t in explicit_tags.split(","))
    elif isinstance(explicit_tags, list):
        tags.extend(_slug(_attribute_text(t)) for t in explicit_tags if _is_scalar(t))

    attributes: dict[str, str] = {}
    for key, value in fm.items():
        if key in _CONSUMED_KEYS or value is None:
            continue
        if _is_scalar(value):
            attributes[key] = _attribute_text(value)
        elif isinstance(value, list) and all(_is_scalar(v) for v in value):
            attributes[key] = ", ".join(_attribute_text(v) for v in value)

    is_eip = "eip" in fm
    title = fm.get("title")
    return Metadata(
        doc_type=DocType.EIP if is_eip else None,
        chain="ethereum" if is_eip else "",
        authors=tuple(authors),
        published_at=published_at,
        tags=tuple(_dedupe(t for t in tags if t)),
        title=str(title).strip() if _is_scalar(title) else "",
        attributes=attributes,
    )


def split_authors(value: str) -> list[str]:
    """Split an EIP author line ("A (@a), B <b@x.org>, et al.") into authors.

    Written by hand because no maintained Python library parses this EIP-1 format:
    commas inside ``(...)``, ``<...>`` or quotes belong to the author, not the list.
    """
    authors: list[str] = []
    current: list[str] = []
    depth = 0
    quote = ""
    for ch in value:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'" and not "".join(current).strip():
            # only a quote opening an author quotes; apostrophes in names (D'Amato) don't
            quote = ch
        elif ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            authors.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    authors.append("".join(current).strip())
    return [a for a in authors if a]


def merge(front: Metadata, explicit: Metadata) -> Metadata:
    """``front`` (from the document) overridden by every field set in ``explicit``
    (from the request). Attributes merge key by key, explicit keys winning."""
    return Metadata(
        doc_type=explicit.doc_type if explicit.doc_type is not None else front.doc_type,
        chain=explicit.chain or front.chain,
        contract_addresses=explicit.contract_addresses or front.contract_addresses,
        authors=explicit.authors or front.authors,
        published_at=(
            explicit.published_at if explicit.published_at is not None else front.published_at
        ),
        tags=explicit.tags or front.tags,
        title=explicit.title or front.title,
        attributes={**front.attributes, **explicit.attributes},
    )


def validate(md: Metadata, *, field_prefix: str = "metadata") -> Metadata:
    """Check the contract's limits and return the normalised metadata.

    Normalises: chain and tags stripped and lower-cased (tags de-duplicated), authors
    and title stripped, contract addresses EIP-55 checksummed (and de-duplicated),
    ``published_at`` in UTC (a naive datetime is taken as UTC, as protobuf's
    ``Timestamp.ToDatetime()`` returns). Raises :class:`InvalidArgument` naming the
    first offending field (e.g. ``metadata.contract_addresses[2]``).
    """
    p = field_prefix

    chain = md.chain.strip().lower()
    if len(chain) > MAX_CHAIN_CHARS:
        _fail(f"{p}.chain", f"chain is {len(chain)} characters; at most {MAX_CHAIN_CHARS}")

    if len(md.contract_addresses) > MAX_ADDRESSES:
        _fail(
            f"{p}.contract_addresses",
            f"{len(md.contract_addresses)} contract addresses; at most {MAX_ADDRESSES}",
        )
    addresses = [
        _checksummed(a, f"{p}.contract_addresses[{i}]") for i, a in enumerate(md.contract_addresses)
    ]

    if len(md.authors) > MAX_AUTHORS:
        _fail(f"{p}.authors", f"{len(md.authors)} authors; at most {MAX_AUTHORS}")
    authors = [a.strip() for a in md.authors]
    for i, author in enumerate(authors):
        if not author:
            _fail(f"{p}.authors[{i}]", "author is empty")
        if len(author) > MAX_AUTHOR_CHARS:
            _fail(
                f"{p}.authors[{i}]",
                f"author is {len(author)} characters; at most {MAX_AUTHOR_CHARS}",
            )

    tags = [t.strip().lower() for t in md.tags]
    for i, tag in enumerate(tags):
        if not tag:
            _fail(f"{p}.tags[{i}]", "tag is empty")
        if len(tag) > MAX_TAG_CHARS:
            _fail(f"{p}.tags[{i}]", f"tag is {len(tag)} characters; at most {MAX_TAG_CHARS}")
    tags = _dedupe(tags)
    if len(tags) > MAX_TAGS:
        _fail(f"{p}.tags", f"{len(tags)} tags; at most {MAX_TAGS}")

    title = md.title.strip()
    if len(title) > MAX_TITLE_CHARS:
        _fail(f"{p}.title", f"title is {len(title)} characters; at most {MAX_TITLE_CHARS}")

    if len(md.attributes) > MAX_ATTRIBUTES:
        _fail(f"{p}.attributes", f"{len(md.attributes)} attributes; at most {MAX_ATTRIBUTES}")
    for key, value in md.attributes.items():
        if not key:
            _fail(f"{p}.attributes", "attribute key is empty")
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            _fail(
                f"{p}.attributes",
                f"attribute {key!r} is {len(value)} characters; "
                f"at most {MAX_ATTRIBUTE_VALUE_CHARS}",
            )

    published_at = md.published_at
    if published_at is not None:
        published_at = (
            published_at.replace(tzinfo=UTC)
            if published_at.tzinfo is None
            else published_at.astimezone(UTC)
        )

    return dataclasses.replace(
        md,
        chain=chain,
        contract_addresses=tuple(_dedupe(addresses)),
        authors=tuple(authors),
        published_at=published_at,
        tags=tuple(tags),
        title=title,
        attributes=dict(md.attributes),
    )


def guess_doc_type(source_url: str, content_type: str) -> DocType:
    """The doc type of a source whose metadata and front matter do not say."""
    parts = urlsplit(source_url)
    host = (parts.hostname or "").lower().removeprefix("www.")
    owner_repo = "/".join(parts.path.strip("/").split("/")[:2]).lower()
    if host in {"eips.ethereum.org", "ercs.ethereum.org"}:
        return DocType.EIP
    if host in {"github.com", "raw.githubusercontent.com"}:
        if owner_repo in {"ethereum/eips", "ethereum/ercs"}:
            return DocType.EIP
        return DocType.GITHUB
    if host in {"ethresear.ch", "ethereum-magicians.org"}:
        return DocType.FORUM
    if content_type.split(";")[0].strip().lower() == "application/pdf":
        return DocType.WHITEPAPER
    return DocType.OTHER


def _checksummed(address: str, field_path: str) -> str:
    if not _ADDRESS_RE.fullmatch(address):
        _fail(
            field_path,
            f"{address!r} is not a contract address (0x followed by 40 hexadecimal digits)",
        )
    checksummed = to_checksum_address(address)
    digits = address[2:]
    # EIP-55: single-case addresses carry no checksum; mixed case must be the checksum.
    if digits != digits.lower() and digits != digits.upper() and address != checksummed:
        _fail(
            field_path,
            f"{address!r} has an invalid EIP-55 checksum (mixed case must match the checksum; "
            "send it all lower case to skip the check)",
        )
    return checksummed


def _parse_date(value: Any, field_path: str, key: str) -> datetime:
    parsed: datetime | None = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
    if parsed is None:
        raise InvalidArgument(
            f"front matter {key!r} is not a date (expected YYYY-MM-DD): {value!r}",
            [(field_path, f"unparseable date {value!r} in front matter key {key!r}")],
        )
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | date)


def _attribute_text(value: Any) -> str:
    if isinstance(value, bool):  # YAML's spelling, not Python's "True"
        return "true" if value else "false"
    if isinstance(value, date):
        return value.isoformat()
    return str(value).strip()


def _slug(value: str) -> str:
    # A one-line regex; a slugify dependency would add transliteration we don't want.
    return _NON_SLUG_RE.sub("-", value.strip().lower()).strip("-")


def _dedupe(values: Any) -> list[str]:
    return list(dict.fromkeys(values))


def _fail(field_path: str, description: str) -> NoReturn:
    raise InvalidArgument(f"{field_path}: {description}", [(field_path, description)])

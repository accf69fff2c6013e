"""Retrieval's values: an indexed chunk, the normalised filter, hits (no gRPC or SQL types).

A :class:`ChunkRecord` carries the chunk as the contract's ``Chunk`` message (what
results return) plus the filterable fields in normal form: lower case where matching
is case-insensitive, ``published_at`` as whole epoch seconds. :meth:`Filter.matches`
is the one definition of what a filter means; every backend's own translation (a
numpy mask, a Qdrant filter, a tantivy query) is tested against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ledgerlens.events.v1 import events_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2

__all__ = ["VALUE_FIELDS", "ChunkRecord", "Filter", "Hit", "VersionKey", "author_keys", "unit"]

#: (document_id, version)
VersionKey = tuple[str, int]

#: the string-valued filter fields, by the name every index (numpy postings, tantivy,
#: Qdrant payload) gives them; ChunkRecord.field_values and Filter.value_sets yield them
#: in this order.
VALUE_FIELDS: tuple[str, ...] = ("chain", "contract", "author", "tag", "source_url", "document_id")

_HANDLE = re.compile(r"@([A-Za-z0-9][A-Za-z0-9_.-]*)")
_EMAIL = re.compile(r"<[^>]*>")


def author_keys(author: str) -> tuple[str, ...]:
    """What an author filter value may say to match ``author``, case-folded.

    Sources write authors as ``Name (@handle)`` or ``Name <email>``; a filter matches
    the author as written, the name alone, or the GitHub handle with or without ``@``.
    """
    written = " ".join(author.split()).casefold()
    keys = {written} if written else set()
    without_email = _EMAIL.sub("", author)  # "x@ethereum.org" is no GitHub handle
    name = re.sub(r"\([^)]*\)", "", without_email)
    name = " ".join(name.split()).casefold()
    if name:
        keys.add(name)
    for handle in _HANDLE.findall(without_email):
        keys.add(handle.casefold())
        keys.add("@" + handle.casefold())
    return tuple(sorted(keys))


def unit(vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``vector`` as float32 scaled to length 1 (cosine is then a dot product)."""
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    return array / np.float32(norm) if norm > 0 else array


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One indexed chunk: the contract's ``Chunk`` (anchor unset), its vector, filter keys."""

    chunk: retrieval_pb2.Chunk
    vector: npt.NDArray[np.float32]
    chain: str
    contract_addresses: tuple[str, ...]
    author_keys: tuple[str, ...]
    doc_type: int
    published_at: int | None
    tags: tuple[str, ...]

    @property
    def chunk_id(self) -> str:
        return self.chunk.chunk_id

    @property
    def document_id(self) -> str:
        return self.chunk.provenance.document_id

    @property
    def version(self) -> int:
        return self.chunk.provenance.version

    @property
    def key(self) -> VersionKey:
        return (self.chunk.provenance.document_id, self.chunk.provenance.version)

    @property
    def source_url(self) -> str:
        return self.chunk.provenance.source_url

    @property
    def text(self) -> str:
        return self.chunk.text

    def field_values(self) -> dict[str, tuple[str, ...]]:
        """The string-valued filter fields, by the names every index gives them."""
        values = (
            (self.chain,) if self.chain else (),
            self.contract_addresses,
            self.author_keys,
            self.tags,
            (self.source_url,),
            (self.document_id,),
        )
        return dict(zip(VALUE_FIELDS, values, strict=True))

    def keyword_text(self) -> str:
        """What BM25 indexes: title, headings and the chunk text."""
        parts = [self.chunk.metadata.title, *self.chunk.heading_path, self.chunk.text]
        return "\n".join(p for p in parts if p)

    @classmethod
    def from_chunk(cls, chunk: retrieval_pb2.Chunk, vector: npt.ArrayLike) -> ChunkRecord:
        meta = chunk.metadata
        authors: set[str] = set()
        for author in meta.authors:
            authors.update(author_keys(author))
        published = meta.published_at.seconds if meta.HasField("published_at") else None
        return cls(
            chunk=chunk,
            vector=unit(vector),
            chain=meta.chain.strip().lower(),
            contract_addresses=tuple(sorted({a.lower() for a in meta.contract_addresses})),
            author_keys=tuple(sorted(authors)),
            doc_type=int(meta.doc_type),
            published_at=published,
            tags=tuple(sorted({t.strip().lower() for t in meta.tags if t.strip()})),
        )

    @classmethod
    def from_event(cls, embedded: events_pb2.EmbeddedChunk) -> ChunkRecord:
        chunk = retrieval_pb2.Chunk(
            chunk_id=embedded.chunk_id,
            text=embedded.text,
            heading_path=embedded.heading_path,
            char_start=embedded.char_start,
            char_end=embedded.char_end,
            chunk_index=embedded.chunk_index,
            token_count=embedded.token_count,
            provenance=embedded.provenance,
            metadata=embedded.metadata,
        )
        chunk.provenance.ClearField("anchor")  # anchors are joined at read time
        return cls.from_chunk(chunk, embedded.vector)


@dataclass(frozen=True, slots=True)
class Filter:
    """A validated search filter: fields AND together, values of one field OR."""

    chains: frozenset[str] = frozenset()
    contract_addresses: frozenset[str] = frozenset()
    authors: frozenset[str] = frozenset()
    doc_types: frozenset[int] = frozenset()
    #: epoch seconds, inclusive
    published_after: int | None = None
    #: epoch seconds, exclusive
    published_before: int | None = None
    tags: frozenset[str] = frozenset()
    source_urls: frozenset[str] = frozenset()
    source_url_prefix: str = ""
    document_ids: frozenset[str] = frozenset()
    _empty: bool = field(init=False, repr=False, compare=False, default=True)

    def __post_init__(self) -> None:
        empty = not (
            self.chains
            or self.contract_addresses
            or self.authors
            or self.doc_types
            or self.published_after is not None
            or self.published_before is not None
            or self.tags
            or self.source_urls
            or self.source_url_prefix
            or self.document_ids
        )
        object.__setattr__(self, "_empty", empty)

    @property
    def empty(self) -> bool:
        return self._empty

    @property
    def has_date_range(self) -> bool:
        return self.published_after is not None or self.published_before is not None

    def value_sets(self) -> list[tuple[str, frozenset[str]]]:
        """The string-valued fields that are set, named as in :meth:`ChunkRecord.field_values`."""
        sets = (
            self.chains,
            self.contract_addresses,
            self.authors,
            self.tags,
            self.source_urls,
            self.document_ids,
        )
        return [(name, values) for name, values in zip(VALUE_FIELDS, sets, strict=True) if values]

    def matches(self, record: ChunkRecord) -> bool:
        if self._empty:
            return True
        if self.chains and record.chain not in self.chains:
            return False
        if self.contract_addresses and self.contract_addresses.isdisjoint(
            record.contract_addresses
        ):
            return False
        if self.authors and self.authors.isdisjoint(record.author_keys):
            return False
        if self.doc_types and record.doc_type not in self.doc_types:
            return False
        if self.has_date_range:
            published = record.published_at
            if published is None:
                return False
            if self.published_after is not None and published < self.published_after:
                return False
            if self.published_before is not None and published >= self.published_before:
                return False
        if self.tags and self.tags.isdisjoint(record.tags):
            return False
        if self.source_urls and record.source_url not in self.source_urls:
            return False
        if self.source_url_prefix and not record.source_url.startswith(self.source_url_prefix):
            return False
        return not (self.document_ids and record.document_id not in self.document_ids)


class Hit(NamedTuple):
    """A chunk id with its score in one ranking (cosine for dense, BM25 for keyword).

    A named tuple rather than a dataclass: a search makes a hundred of them, and a
    tuple is built several times faster (``dict(hits)`` maps id to score)."""

    chunk_id: str
    score: float

"""BM25 keyword search over chunk text, with tantivy (a Rust full-text engine).

tantivy gives BM25 scoring with block-max WAND top-k, English stemming, incremental
adds and deletes, and an on-disk index that survives restarts; filters become term,
range and regex clauses scored zero, so a result always passes its filter and
selective filters cost nothing extra. The index lives in ``data_dir/keyword`` and is
committed before a write returns. What BM25 sees is the chunk's title, headings and
text (:meth:`ChunkRecord.keyword_text`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import tantivy

from ledgerlens.services.retrieval.model import (
    VALUE_FIELDS,
    ChunkRecord,
    Filter,
    Hit,
    VersionKey,
)

__all__ = ["KeywordIndex"]

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
#: exact-match fields: the stored id, what removals match on, and the filter fields
_RAW_FIELDS = ("chunk_id", "version_key", *VALUE_FIELDS)
# tantivy's regex syntax is Rust's: escape every character that is not a letter,
# digit or underscore (superfluous escapes of punctuation are allowed there).
_REGEX_META = re.compile(r"([^A-Za-z0-9_])")


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    for name in _RAW_FIELDS:
        builder.add_text_field(name, stored=name == "chunk_id", tokenizer_name="raw")
    builder.add_unsigned_field("doc_type", indexed=True)
    builder.add_integer_field("published", indexed=True, fast=True)
    builder.add_text_field("text", stored=False, tokenizer_name=_TEXT_ANALYZER)
    return builder.build()


#: English words, lower-cased, without stop words ("the", "of", ...), stemmed. Stop
#: words carry almost no BM25 weight but have the longest posting lists: leaving them
#: out of the index and of queries makes a search of a sentence several times cheaper.
_TEXT_ANALYZER = "en_text"


def _text_analyzer() -> tantivy.TextAnalyzer:
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.stopword("english"))
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def _version_key(key: VersionKey) -> str:
    return f"{key[0]}:{key[1]}"


class KeywordIndex:
    def __init__(self, data_dir: str | Path, *, heap_bytes: int = 64 * 1024 * 1024) -> None:
        self._path = Path(data_dir) / "keyword"
        self._heap = heap_bytes
        self._schema = _schema()
        self._index: tantivy.Index | None = None
        self._writer: tantivy.IndexWriter | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self._path.mkdir(parents=True, exist_ok=True)
        try:
            self._index = tantivy.Index(self._schema, path=str(self._path), reuse=True)
        except ValueError as exc:  # another schema (an older release): rebuilt from the backend
            log.warning("keyword index unusable (%s); starting it empty", exc)
            shutil.rmtree(self._path)
            self._path.mkdir(parents=True)
            self._index = tantivy.Index(self._schema, path=str(self._path), reuse=False)
        self._index.register_tokenizer(_TEXT_ANALYZER, _text_analyzer())
        self._writer = self._index.writer(self._heap, 1)

    async def stop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.to_thread(writer.wait_merging_threads)

    @property
    def _live_writer(self) -> tantivy.IndexWriter:
        if self._writer is None:
            raise RuntimeError("keyword index is not open")
        return self._writer

    @property
    def _live_index(self) -> tantivy.Index:
        if self._index is None:
            raise RuntimeError("keyword index is not open")
        return self._index

    # -- writes (each committed before it returns) ---------------------------------------

    def _document(self, record: ChunkRecord) -> tantivy.Document:
        doc = tantivy.Document()
        doc.add_text("chunk_id", record.chunk_id)
        doc.add_text("version_key", _version_key(record.key))
        for name, values in record.field_values().items():
            for value in values:
                doc.add_text(name, value)
        doc.add_unsigned("doc_type", record.doc_type)
        if record.published_at is not None:
            doc.add_integer("published", record.published_at)
        doc.add_text("text", record.keyword_text())
        return doc

    def _commit(self) -> None:
        self._live_writer.commit()
        self._live_index.reload()

    def _upsert(self, records: Sequence[ChunkRecord]) -> None:
        writer = self._live_writer
        for record in records:
            writer.delete_documents_by_term("chunk_id", record.chunk_id)
            writer.add_document(self._document(record))
        self._commit()

    async def upsert(self, records: Sequence[ChunkRecord]) -> None:
        if records:
            await asyncio.to_thread(self._upsert, records)

    def _remove(self, keys: Sequence[VersionKey]) -> None:
        writer = self._live_writer
        for key in keys:
            writer.delete_documents_by_term("version_key", _version_key(key))
        self._commit()

    async def remove_versions(self, keys: Sequence[VersionKey]) -> None:
        if keys:
            await asyncio.to_thread(self._remove, keys)

    async def rebuild(self, records: AsyncIterator[ChunkRecord]) -> int:
        """Replace the whole index with ``records`` (after it was lost or went stale)."""
        await asyncio.to_thread(self._live_writer.delete_all_documents)
        batch: list[ChunkRecord] = []
        total = 0
        async for record in records:
            batch.append(record)
            if len(batch) >= 2000:
                await asyncio.to_thread(self._add_all, batch)
                total += len(batch)
                batch = []
        await asyncio.to_thread(self._add_all, batch)
        total += len(batch)
        await asyncio.to_thread(self._commit)
        return total

    def _add_all(self, records: Sequence[ChunkRecord]) -> None:
        writer = self._live_writer
        for record in records:
            writer.add_document(self._document(record))

    # -- reads -------------------------------------------------------------------------

    def count(self) -> int:
        return int(self._live_index.searcher().num_docs)

    def search(self, text: str, flt: Filter, k: int) -> list[Hit]:
        """The ``k`` best BM25 matches of ``text`` that pass ``flt``, best first."""
        words = [w.lower() for w in _WORD.findall(text)]
        if not words or k <= 0:
            return []
        index = self._live_index
        query = index.parse_query(" ".join(words), ["text"])
        restriction = self._filter_query(flt)
        if restriction is not None:
            query = tantivy.Query.boolean_query(
                [
                    (tantivy.Occur.Must, query),
                    (tantivy.Occur.Must, tantivy.Query.const_score_query(restriction, 0.0)),
                ]
            )
        searcher = index.searcher()
        result = searcher.search(query, k, count=False)
        hits: list[Hit] = []
        for score, address in result.hits:
            stored = searcher.doc(address)
            hits.append(Hit(stored["chunk_id"][0], float(score)))
        return hits

    def _filter_query(self, flt: Filter) -> tantivy.Query | None:
        if flt.empty:
            return None
        schema = self._schema
        clauses: list[tantivy.Query] = []
        for name, values in flt.value_sets():
            clauses.append(tantivy.Query.term_set_query(schema, name, sorted(values)))
        if flt.doc_types:
            clauses.append(tantivy.Query.term_set_query(schema, "doc_type", sorted(flt.doc_types)))
        if flt.has_date_range:
            clauses.append(
                tantivy.Query.range_query(
                    schema,
                    "published",
                    tantivy.FieldType.Integer,
                    flt.published_after,
                    None if flt.published_before is None else flt.published_before - 1,
                    True,
                    True,
                )
            )
        if flt.source_url_prefix:
            pattern = _REGEX_META.sub(r"\\\1", flt.source_url_prefix) + ".*"
            clauses.append(tantivy.Query.regex_query(schema, "source_url", pattern))
        if len(clauses) == 1:
            return clauses[0]
        return tantivy.Query.boolean_query([(tantivy.Occur.Must, c) for c in clauses])

"""The EIP corpus as retrieval's indexed chunks, built exactly as ingestion builds them.

Each ``eip-N.md`` is prepared and chunked with ingestion's own code and defaults
(``prepare`` + ``chunk_prepared``, the service's token budget and overlap), and every
chunk's ``embedding_text`` (context line + text) is embedded with the bundled model.
The records carry what an ``ingestion.chunks.embedded`` event would: provenance
(``document_id_for(source_url)``, version 1, ``source_url``
``https://eips.ethereum.org/EIPS/eip-N`` so :func:`eip_number` recovers the EIP, the
sha256 of the normalised text) and the document's metadata (title, authors, created
date, tags, doc type, front-matter attributes such as ``eip``). All 949 files are
kept, including the 365 ``Moved`` stubs: they are real documents of the corpus.

Embedding ~16,000 chunks takes about 15 minutes on two CPUs, so the vectors are kept
in a cache keyed by the sha256 of the embedded text, ``.data/eval/<model>.npz`` in the
repository (``.data`` is git-ignored); it is saved as embedding goes, so an
interrupted build resumes where it stopped. Chunking itself takes seconds.

Used by ``services/retrieval/eval/run.py`` and ``bench/retrieval_search.py`` (which
put this directory on ``sys.path``): :func:`load_corpus` for the records,
:func:`embed_texts` for query vectors (same model, same cache) and :func:`open_index`
for the service's own index (SQLite store, HNSW backend, tantivy keyword index) filled
through its :class:`Indexer`, in this process.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ledgerlens.common.v1 import common_pb2
from ledgerlens.embedding.settings import DEFAULT_MODEL
from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.services.retrieval.index.local import LocalBackend
from ledgerlens.services.retrieval.indexer import Indexer, IndexState
from ledgerlens.services.retrieval.keyword import KeywordIndex
from ledgerlens.services.retrieval.model import ChunkRecord
from ledgerlens.services.retrieval.settings import LocalIndexSettings
from ledgerlens.services.retrieval.store import Store

__all__ = [
    "CORPUS_ENV",
    "SOURCE_URL_PREFIX",
    "LocalIndex",
    "cache_path_for",
    "corpus_dir",
    "eip_number",
    "embed_texts",
    "load_corpus",
    "open_index",
    "source_url_for",
]

REPO = Path(__file__).resolve().parents[3]
CORPUS_ENV = "LEDGERLENS_CORPUS_DIR"
SOURCE_URL_PREFIX = "https://eips.ethereum.org/EIPS/eip-"
_EIP_FILE = re.compile(r"eip-(\d+)\.md$")
_EIP_URL = re.compile(re.escape(SOURCE_URL_PREFIX) + r"(\d+)$")
#: texts embedded between two saves of the cache
_SAVE_EVERY = 1024
#: a snapshot interval (seconds) that never passes in a run
_NO_SNAPSHOTS = 7 * 24 * 3600.0


def corpus_dir() -> Path:
    """``$LEDGERLENS_CORPUS_DIR``, else ``../shared/corpus/eips`` next to the repository."""
    explicit = os.environ.get(CORPUS_ENV)
    candidate = Path(explicit) if explicit else REPO.parent / "shared"
    eips = candidate if candidate.name == "eips" else candidate / "corpus" / "eips"
    if not eips.is_dir():
        raise FileNotFoundError(f"no EIP corpus at {eips} (set {CORPUS_ENV})")
    return eips.resolve()


def source_url_for(number: int) -> str:
    return f"{SOURCE_URL_PREFIX}{number}"


def eip_number(source_url: str) -> int | None:
    """The EIP number of one of this corpus's source URLs (None for any other URL)."""
    found = _EIP_URL.match(source_url)
    return int(found.group(1)) if found else None


def cache_path_for(model: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)
    return REPO / ".data" / "eval" / f"{safe}.npz"


def _save(embedder: CachingEmbedder, path: Path) -> None:
    """Save the cache atomically (a reader never sees half a file)."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    embedder.save(tmp)
    os.replace(tmp, path)


def _files(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.glob("eip-*.md"):
        match = _EIP_FILE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _log(message: str) -> None:
    print(f"[corpus] {message}", file=sys.stderr, flush=True)


def load_corpus(
    *,
    root: Path | None = None,
    cache_path: Path | None = None,
    limit: int | None = None,
    log: Callable[[str], None] | None = _log,
) -> list[ChunkRecord]:
    """Every chunk of the EIP corpus as a :class:`ChunkRecord` with its vector, in EIP
    then chunk order. ``limit``: only the first ``limit`` EIPs (a quick run).

    Loads the model (seconds), chunks every file (seconds), embeds what the vector
    cache lacks (minutes, once per machine) and saves the cache.
    """
    from ledgerlens.embedding import LocalEmbedder
    from ledgerlens.services.ingestion.convert import metadata_to_proto
    from ledgerlens.services.ingestion.ingest import (
        chunk_id_for,
        chunk_prepared,
        document_id_for,
        prepare,
    )
    from ledgerlens.services.ingestion.model import IngestRequest
    from ledgerlens.services.ingestion.settings import Settings as IngestionSettings

    say = log or (lambda _message: None)
    files = _files(root or corpus_dir())
    if limit is not None:
        files = files[:limit]
    settings = IngestionSettings()  # the service's defaults: the same chunks as ingestion
    inner = LocalEmbedder.load(batch_size=settings.embedding.batch_size)
    embedder = CachingEmbedder(inner)
    path = cache_path or cache_path_for(inner.model)
    try:
        embedder.load(path)
        max_tokens = min(settings.chunk_max_tokens, inner.max_tokens)
        chunks: list[retrieval_pb2.Chunk] = []
        texts: list[str] = []
        for number, file in files:
            source_url = source_url_for(number)
            request = IngestRequest(
                source_url=source_url, content=file.read_bytes(), content_type="text/markdown"
            )
            prepared = prepare(request)
            document_id = document_id_for(source_url)
            provenance = common_pb2.Provenance(
                document_id=document_id,
                version=1,
                source_url=source_url,
                sha256=prepared.parsed.sha256,
            )
            metadata = metadata_to_proto(prepared.metadata)
            for piece in chunk_prepared(
                prepared,
                inner.tokenizer,
                max_tokens=max_tokens,
                overlap_tokens=settings.chunk_overlap_tokens,
            ):
                chunks.append(
                    retrieval_pb2.Chunk(
                        chunk_id=chunk_id_for(document_id, 1, piece.index),
                        text=piece.text,
                        heading_path=list(piece.heading_path),
                        char_start=piece.char_start,
                        char_end=piece.char_end,
                        chunk_index=piece.index,
                        token_count=piece.token_count,
                        provenance=provenance,
                        metadata=metadata,
                    )
                )
                texts.append(piece.embedding_text)
        vectors = asyncio.run(_embed_all(embedder, texts, path, say))
    finally:
        inner.close()
    say(f"{len(files)} EIPs, {len(chunks)} chunks")
    return [ChunkRecord.from_chunk(c, v) for c, v in zip(chunks, vectors, strict=True)]


async def _embed_all(
    embedder: CachingEmbedder, texts: list[str], path: Path, say: Callable[[str], None]
) -> list[list[float]]:
    """Vectors of ``texts``, embedding in groups and saving the cache after each new one."""
    vectors: list[list[float]] = []
    started = time.perf_counter()
    for start in range(0, len(texts), _SAVE_EVERY):
        before = embedder.embedded
        vectors += await embedder.embed(texts[start : start + _SAVE_EVERY])
        if embedder.embedded > before:
            _save(embedder, path)
            rate = embedder.embedded / (time.perf_counter() - started)
            say(
                f"embedded {embedder.embedded} new texts ({rate:.1f}/s), "
                f"{min(start + _SAVE_EVERY, len(texts))}/{len(texts)} chunks done"
            )
    return vectors


def embed_texts(
    texts: Sequence[str], *, cache_path: Path | None = None, batch_size: int = 32
) -> npt.NDArray[np.float32]:
    """Vectors of ``texts`` (e.g. queries) with the bundled model, through the same
    cache as the corpus; one row per text."""
    from ledgerlens.embedding import LocalEmbedder

    inner = LocalEmbedder.load(batch_size=batch_size)
    embedder = CachingEmbedder(inner)
    path = cache_path or cache_path_for(inner.model)
    try:
        embedder.load(path)
        vectors = asyncio.run(embedder.embed(list(texts)))
        if embedder.embedded:
            _save(embedder, path)
    finally:
        inner.close()
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


@dataclass
class LocalIndex:
    """The service's index parts, open in this process."""

    store: Store
    state: IndexState
    backend: LocalBackend
    keyword: KeywordIndex
    indexer: Indexer
    database_url: str
    data_dir: Path


@asynccontextmanager
async def open_index(
    records: Sequence[ChunkRecord],
    workdir: Path,
    *,
    settings: LocalIndexSettings | None = None,
    model: str = DEFAULT_MODEL,
    batch: int = 2000,
    log: Callable[[str], None] | None = _log,
) -> AsyncIterator[LocalIndex]:
    """A SQLite database and data dir under ``workdir`` (``retrieval.db``, ``data/``)
    holding ``records``, written through the service's :class:`Indexer` in batches
    (as its event handler would); closed (HNSW snapshot written) on exit, so the
    service started on the same paths loads it as it is."""
    from ledgerlens.runtime.db import create_engine
    from ledgerlens.services.retrieval.migrate import migrate

    say = log or (lambda _message: None)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    database_url = f"sqlite+aiosqlite:///{workdir / 'retrieval.db'}"
    data_dir = workdir / "data"
    await migrate(database_url)
    async with AsyncExitStack() as stack:
        engine = create_engine(database_url)
        stack.push_async_callback(engine.dispose)
        store = Store(engine)
        state = IndexState(store)
        await state.load()
        dimensions = int(records[0].vector.shape[0]) if records else 384
        # No periodic snapshots (the one at stop is enough): LocalBackend.stop() cancels
        # a snapshot task whose save thread keeps running, then saves again, and the two
        # race on graph.tmp (FileNotFoundError at stop) if the interval passed meanwhile.
        local = settings or LocalIndexSettings(snapshot_interval_seconds=_NO_SNAPSHOTS)
        backend = LocalBackend(store, data_dir, dimensions, local)
        await backend.start()
        stack.push_async_callback(backend.stop)
        keyword = KeywordIndex(data_dir)
        await keyword.start()
        stack.push_async_callback(keyword.stop)
        indexer = Indexer(backend, keyword, state, model=model, dimensions=dimensions)
        await indexer.reconcile()
        started = time.perf_counter()
        for start in range(0, len(records), batch):
            await indexer.index(records[start : start + batch])
        if records:
            say(f"indexed {len(records)} chunks in {time.perf_counter() - started:.1f}s")
        yield LocalIndex(store, state, backend, keyword, indexer, database_url, data_dir)


if __name__ == "__main__":  # warm the cache: python services/retrieval/eval/corpus.py
    records = load_corpus()
    print(f"{len(records)} chunks of {len({r.document_id for r in records})} documents")

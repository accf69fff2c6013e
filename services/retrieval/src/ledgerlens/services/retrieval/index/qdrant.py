"""The Qdrant backend: a server or cluster (``url``), or qdrant-client's local mode (``path``).

Points: one per chunk, its id the UUID5 of the chunk id (so an upsert of a chunk
replaces it), its vector the chunk's (cosine distance; Qdrant stores it normalised),
and a payload of the serialised ``Chunk`` (base64, what results return) plus the
filter fields of :class:`~ledgerlens.services.retrieval.model.ChunkRecord` in normal
form: ``chain``, ``contract``, ``author`` (the author keys), ``tag``, ``source_url``,
``source_url_dirs``, ``document_id``, ``version``, ``version_key``
(``"<document_id>:<version>"``, what removals match on), ``doc_type`` and
``published`` (epoch seconds; absent when the document has no date, so a date range
excludes it). Every write waits for the server to apply it (``wait=True``): it is
durable when it returns.

A :class:`~ledgerlens.services.retrieval.model.Filter` becomes one ``must`` condition
per set field: ``MatchAny`` for the sets (values OR), ``Range(gte=after, lt=before)``
on ``published``.

``source_url_prefix`` is a plain string prefix, which no Qdrant condition matches
exactly (``MatchText`` matches tokens, not prefixes; a list of every prefix of every
URL would dwarf the rest of the payload). So each point also carries
``source_url_dirs``, the prefixes of its URL that end with ``/``
(``https://eips.ethereum.org/EIPS/eip-1`` has ``https:/``, ``https://``,
``https://eips.ethereum.org/`` and ``https://eips.ethereum.org/EIPS/``), and:

* a prefix that ends with ``/`` is exactly ``source_url_dirs`` containing it;
* any other prefix is cut back to its last ``/`` (its "directory", possibly empty);
  the distinct ``source_url`` values of the points under that directory that also
  pass the rest of the filter are listed with a facet (exact; local mode supports
  facets too), the ones starting with the prefix kept, and the search matches
  ``source_url`` against them (no match: no hits, without a search).

Both are exact. The second costs one facet request, over few values when the
directory is specific; a URL indexed between the facet and the search is missed by
that one search (it never returns a chunk failing the filter).

``get()`` returns complete records (vectors included, as Qdrant stores them:
unit length). ``records()``, which only feeds the keyword index's rebuild, leaves the
vectors out: its records carry a zero vector.

Payload indexes are created for every filtered field (a cluster needs them to filter
fast; faceting ``source_url`` needs its keyword index). Local mode ignores them and
answers every search by a brute-force scan in the event loop: it is for development
and tests, not for large indexes.
"""

from __future__ import annotations

import base64
import logging
import math
import uuid
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.conversions.common_types import PointId
from qdrant_client.http.exceptions import UnexpectedResponse

from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.services.retrieval.model import (
    VALUE_FIELDS,
    ChunkRecord,
    Filter,
    Hit,
    VersionKey,
)
from ledgerlens.services.retrieval.settings import QdrantSettings

__all__ = ["QdrantBackend", "point_id", "url_dirs"]

log = logging.getLogger(__name__)

#: namespace of the points' UUID5 ids (fixed: changing it orphans every point).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://ledgerlens/retrieval/chunk")

_KEYWORD_FIELDS = (*VALUE_FIELDS, "source_url_dirs", "version_key")
_INTEGER_FIELDS = ("doc_type", "published")

#: points per upsert request; version keys per removal request.
_UPSERT_BATCH = 256
_REMOVE_BATCH = 512
#: points per page when scrolling every record.
_SCROLL_PAGE = 512
#: distinct URLs asked of the first facet request (grown until all are listed).
_FACET_LIMIT = 1024


def point_id(chunk_id: str) -> str:
    """The point id of a chunk: deterministic, so an upsert replaces the point."""
    return str(uuid.uuid5(_NAMESPACE, chunk_id))


def url_dirs(url: str) -> list[str]:
    """The prefixes of ``url`` that end with ``/`` (shortest first)."""
    return [url[: i + 1] for i, char in enumerate(url) if char == "/"]


def _version_key(key: VersionKey) -> str:
    return f"{key[0]}:{key[1]}"


def _payload(record: ChunkRecord) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "chunk_id": record.chunk_id,
        "chunk": base64.b64encode(record.chunk.SerializeToString()).decode("ascii"),
        "chain": record.chain,
        "contract": list(record.contract_addresses),
        "author": list(record.author_keys),
        "tag": list(record.tags),
        "source_url": record.source_url,
        "source_url_dirs": url_dirs(record.source_url),
        "document_id": record.document_id,
        "version": record.version,
        "version_key": _version_key(record.key),
        "doc_type": record.doc_type,
    }
    if record.published_at is not None:
        payload["published"] = record.published_at
    return payload


def _any(key: str, values: list[str] | list[int]) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchAny(any=values))


def _conditions(flt: Filter) -> list[models.Condition]:
    """Every field of ``flt`` but ``source_url_prefix``, one condition each."""
    conditions: list[models.Condition] = []
    for key, values in flt.value_sets():
        conditions.append(_any(key, sorted(values)))
    if flt.doc_types:
        conditions.append(_any("doc_type", sorted(flt.doc_types)))
    if flt.has_date_range:
        # a point without ``published`` fails any range condition on it
        conditions.append(
            models.FieldCondition(
                key="published",
                range=models.Range(gte=flt.published_after, lt=flt.published_before),
            )
        )
    return conditions


def _chunk_of(payload: dict[str, Any] | None) -> retrieval_pb2.Chunk | None:
    if not payload:
        return None
    encoded = payload.get("chunk")
    if not isinstance(encoded, str):
        return None
    return retrieval_pb2.Chunk.FromString(base64.b64decode(encoded))


class QdrantBackend:
    name = "qdrant"

    def __init__(self, settings: QdrantSettings, data_dir: str | Path, dimensions: int) -> None:
        self._settings = settings
        self._path = None if settings.url else Path(settings.path or Path(data_dir) / "qdrant")
        self._dim = dimensions
        self._collection = settings.collection
        self._client: AsyncQdrantClient | None = None

    @property
    def local(self) -> bool:
        """Whether this is qdrant-client's local mode (no server)."""
        return self._path is not None

    @property
    def client(self) -> AsyncQdrantClient:
        if self._client is None:
            raise RuntimeError("the Qdrant backend is not started")
        return self._client

    # -- lifecycle ---------------------------------------------------------------------

    def _connect(self) -> AsyncQdrantClient:
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)
            return AsyncQdrantClient(path=str(self._path))
        api_key = self._settings.api_key
        return AsyncQdrantClient(
            url=self._settings.url,
            api_key=api_key.get_secret_value() if api_key is not None else None,
            timeout=max(1, math.ceil(self._settings.timeout_seconds)),
            prefer_grpc=self._settings.prefer_grpc,
        )

    async def start(self) -> None:
        self._client = self._connect()
        try:
            existing = await self._open_collection()
            await self._create_indexes(existing)
        except BaseException:
            await self.stop()
            raise
        where = str(self._path) if self._path is not None else self._settings.url
        log.info("Qdrant collection %s at %s is open", self._collection, where)

    async def _open_collection(self) -> set[str]:
        """Create the collection if missing, check it if not; its indexed fields."""
        client = self.client
        if not await client.collection_exists(self._collection):
            try:
                await client.create_collection(
                    self._collection,
                    vectors_config=models.VectorParams(
                        size=self._dim, distance=models.Distance.COSINE
                    ),
                )
                log.info("created Qdrant collection %s", self._collection)
                return set()
            except (UnexpectedResponse, grpc.RpcError, ValueError):
                # another replica may have created it meanwhile
                if not await client.collection_exists(self._collection):
                    raise
        info = await client.get_collection(self._collection)
        vectors = info.config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise RuntimeError(
                f"Qdrant collection {self._collection!r} has named vectors; this service "
                "needs a single unnamed vector (use another collection)"
            )
        if vectors.size != self._dim:
            raise RuntimeError(
                f"Qdrant collection {self._collection!r} holds {vectors.size}-dimensional "
                f"vectors; this service embeds in {self._dim} dimensions (another model?). "
                "Configure another collection, or drop this one to reindex."
            )
        if vectors.distance != models.Distance.COSINE:
            raise RuntimeError(
                f"Qdrant collection {self._collection!r} uses {vectors.distance} distance; "
                "this service needs cosine"
            )
        return set(info.payload_schema or {})

    async def _create_indexes(self, existing: set[str]) -> None:
        wanted = [(f, models.PayloadSchemaType.KEYWORD) for f in _KEYWORD_FIELDS]
        wanted += [(f, models.PayloadSchemaType.INTEGER) for f in _INTEGER_FIELDS]
        with warnings.catch_warnings():
            if self.local:  # local mode warns that payload indexes do nothing there
                warnings.simplefilter("ignore", UserWarning)
            for field, schema in wanted:
                if field not in existing:
                    await self.client.create_payload_index(
                        self._collection, field, field_schema=schema, wait=True
                    )

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- writes ------------------------------------------------------------------------

    async def upsert(self, records: Sequence[ChunkRecord]) -> None:
        if not records:
            return
        for record in records:
            if record.vector.shape != (self._dim,):
                raise ValueError(
                    f"chunk {record.chunk_id} has {record.vector.shape[0]} dimensions, "
                    f"the index has {self._dim}"
                )
        unique = list({r.chunk_id: r for r in records}.values())
        for start in range(0, len(unique), _UPSERT_BATCH):
            points = [
                models.PointStruct(
                    id=point_id(r.chunk_id),
                    vector=r.vector.astype(np.float32).tolist(),
                    payload=_payload(r),
                )
                for r in unique[start : start + _UPSERT_BATCH]
            ]
            await self.client.upsert(self._collection, points=points, wait=True)

    async def remove_versions(self, keys: Sequence[VersionKey]) -> int:
        removed = 0
        names = sorted({_version_key(k) for k in keys})
        for start in range(0, len(names), _REMOVE_BATCH):
            batch = names[start : start + _REMOVE_BATCH]
            selector = models.Filter(must=[_any("version_key", batch)])
            found = await self.client.count(self._collection, count_filter=selector, exact=True)
            if found.count:
                await self.client.delete(
                    self._collection,
                    points_selector=models.FilterSelector(filter=selector),
                    wait=True,
                )
                removed += found.count
        return removed

    # -- reads -------------------------------------------------------------------------

    async def count(self) -> int:
        return (await self.client.count(self._collection, exact=True)).count

    async def get(self, chunk_ids: Sequence[str]) -> dict[str, ChunkRecord]:
        wanted = set(chunk_ids)
        if not wanted:
            return {}
        points = await self.client.retrieve(
            self._collection,
            ids=[point_id(cid) for cid in sorted(wanted)],
            with_payload=["chunk"],
            with_vectors=True,
        )
        found: dict[str, ChunkRecord] = {}
        for point in points:
            chunk = _chunk_of(point.payload)
            if chunk is None or chunk.chunk_id not in wanted:
                continue
            vector = point.vector
            if not isinstance(vector, list):
                raise RuntimeError(f"point {point.id} has no single vector")
            found[chunk.chunk_id] = ChunkRecord.from_chunk(chunk, vector)
        return found

    async def records(self) -> AsyncIterator[ChunkRecord]:
        """Every record, its vector left out (zeros): the keyword index needs none."""
        zeros = np.zeros(self._dim, dtype=np.float32)
        offset: PointId | None = None
        while True:
            points, offset = await self.client.scroll(
                self._collection,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=["chunk"],
                with_vectors=False,
            )
            for point in points:
                chunk = _chunk_of(point.payload)
                if chunk is not None:
                    yield ChunkRecord.from_chunk(chunk, zeros)
            if offset is None:
                return

    def memory_bytes(self) -> int | None:
        return None

    async def search(
        self,
        vector: npt.NDArray[np.float32],
        flt: Filter,
        k: int,
        *,
        at_least: int | None = None,  # Qdrant filters inside its graph walk: always k
    ) -> list[Hit]:
        if k <= 0:
            return []
        conditions = _conditions(flt)
        if flt.source_url_prefix:
            prefix_condition = await self._prefix_condition(flt.source_url_prefix, conditions)
            if prefix_condition is None:
                return []
            conditions.append(prefix_condition)
        response = await self.client.query_points(
            self._collection,
            query=np.asarray(vector, dtype=np.float32).tolist(),
            query_filter=models.Filter(must=conditions) if conditions else None,
            limit=k,
            with_payload=["chunk_id"],
            with_vectors=False,
        )
        hits: list[Hit] = []
        for point in response.points:
            chunk_id = (point.payload or {}).get("chunk_id")
            if isinstance(chunk_id, str):
                hits.append(Hit(chunk_id, float(point.score)))
        return hits

    async def _prefix_condition(
        self, prefix: str, others: Sequence[models.Condition]
    ) -> models.Condition | None:
        """The exact condition for ``source_url`` starting with ``prefix`` (None: no
        point passing ``others`` has such a URL). See the module's docstring."""
        directory = prefix[: prefix.rfind("/") + 1]
        if directory == prefix:
            return models.FieldCondition(
                key="source_url_dirs", match=models.MatchValue(value=prefix)
            )
        scope = list(others)
        if directory:
            scope.append(
                models.FieldCondition(
                    key="source_url_dirs", match=models.MatchValue(value=directory)
                )
            )
        urls = [u for u in await self._distinct_urls(scope) if u.startswith(prefix)]
        if not urls:
            return None
        return _any("source_url", sorted(urls))

    async def _distinct_urls(self, scope: Sequence[models.Condition]) -> list[str]:
        limit = _FACET_LIMIT
        while True:
            response = await self.client.facet(
                self._collection,
                "source_url",
                facet_filter=models.Filter(must=list(scope)) if scope else None,
                limit=limit,
                exact=True,
            )
            if len(response.hits) < limit:
                return [h.value for h in response.hits if isinstance(h.value, str)]
            limit *= 4

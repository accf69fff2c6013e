"""SQL access of the retrieval service (SQLite by default, PostgreSQL alike).

Callers serialise writes (the :class:`~ledgerlens.services.retrieval.indexer.Indexer`
holds one lock for every change), so no method here needs to guard against another
writer of this process. A database error surfaces as UNAVAILABLE: the event that
caused the write is not acked and comes back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import delete, func, insert, select, tuple_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledgerlens.common.v1 import common_pb2
from ledgerlens.runtime.errors import Unavailable
from ledgerlens.services.retrieval.model import VersionKey
from ledgerlens.services.retrieval.schema import AnchorRow, ChunkRow, StateRow, TombstoneRow

__all__ = ["Store", "StoredChunk"]

StoredChunk = tuple[int, str, bytes, bytes]  # slot, chunk_id, Chunk bytes, vector bytes

_GENERATION = "generation"
_BATCH = 500


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- chunks (the embedded backend's durable copy) ----------------------------------

    async def iter_chunks(self) -> AsyncIterator[StoredChunk]:
        query = select(ChunkRow.slot, ChunkRow.chunk_id, ChunkRow.chunk, ChunkRow.vector).order_by(
            ChunkRow.slot
        )
        async with self.engine.connect() as conn:
            result = await conn.stream(query.execution_options(yield_per=2000))
            async for slot, chunk_id, chunk, vector in result:
                yield slot, chunk_id, chunk, vector

    async def max_slot(self) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(func.max(ChunkRow.slot)))
        return int(value) if value is not None else 0

    async def generation(self) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(StateRow.value).where(StateRow.name == _GENERATION))
        return int(value) if value is not None else 0

    async def replace_chunks(
        self, rows: Sequence[StoredChunk], keys: Sequence[tuple[str, int]]
    ) -> int:
        """Write ``rows`` (replacing rows with the same chunk ids) in one transaction;
        ``keys`` are each row's (document_id, version). Returns the new generation."""
        try:
            async with self.engine.begin() as conn:
                ids = [row[1] for row in rows]
                for start in range(0, len(ids), _BATCH):
                    await conn.execute(
                        delete(ChunkRow).where(ChunkRow.chunk_id.in_(ids[start : start + _BATCH]))
                    )
                if rows:
                    await conn.execute(
                        insert(ChunkRow),
                        [
                            {
                                "slot": slot,
                                "chunk_id": chunk_id,
                                "document_id": key[0],
                                "version": key[1],
                                "chunk": chunk,
                                "vector": vector,
                            }
                            for (slot, chunk_id, chunk, vector), key in zip(rows, keys, strict=True)
                        ],
                    )
                return await self._bump(conn)
        except OperationalError as exc:
            raise Unavailable(f"retrieval database unavailable: {exc.orig}") from exc

    async def delete_versions(self, keys: Iterable[VersionKey]) -> tuple[list[int], int]:
        """Delete the chunks of these versions; returns their slots and the new generation."""
        wanted = list(keys)
        try:
            async with self.engine.begin() as conn:
                slots: list[int] = []
                for start in range(0, len(wanted), _BATCH):
                    part = wanted[start : start + _BATCH]
                    where = tuple_(ChunkRow.document_id, ChunkRow.version).in_(part)
                    found = await conn.scalars(select(ChunkRow.slot).where(where))
                    slots.extend(found)
                    await conn.execute(delete(ChunkRow).where(where))
                return slots, await self._bump(conn)
        except OperationalError as exc:
            raise Unavailable(f"retrieval database unavailable: {exc.orig}") from exc

    async def _bump(self, conn: AsyncConnection) -> int:
        updated = await conn.execute(
            update(StateRow)
            .where(StateRow.name == _GENERATION)
            .values(value=StateRow.value + 1)
            .returning(StateRow.value)
        )
        value = updated.scalar_one_or_none()
        if value is None:
            await conn.execute(insert(StateRow), {"name": _GENERATION, "value": 1})
            return 1
        return int(value)

    # -- tombstones and anchors --------------------------------------------------------

    async def tombstones(self) -> set[VersionKey]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(TombstoneRow.document_id, TombstoneRow.version))
            return {(doc, int(version)) for doc, version in rows}

    async def add_tombstones(self, keys: Iterable[VersionKey], reason: str) -> None:
        wanted = set(keys)
        if not wanted:
            return
        now = datetime.now(UTC)
        try:
            async with self.engine.begin() as conn:
                rows = await conn.execute(
                    select(TombstoneRow.document_id, TombstoneRow.version).where(
                        tuple_(TombstoneRow.document_id, TombstoneRow.version).in_(list(wanted))
                    )
                )
                new = wanted - {(doc, int(version)) for doc, version in rows}
                if new:
                    await conn.execute(
                        insert(TombstoneRow),
                        [
                            {"document_id": d, "version": v, "reason": reason, "created_at": now}
                            for d, v in sorted(new)
                        ],
                    )
        except OperationalError as exc:
            raise Unavailable(f"retrieval database unavailable: {exc.orig}") from exc

    async def anchors(self) -> dict[VersionKey, tuple[str, common_pb2.LedgerAnchor]]:
        found: dict[VersionKey, tuple[str, common_pb2.LedgerAnchor]] = {}
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(AnchorRow.document_id, AnchorRow.version, AnchorRow.sha256, AnchorRow.anchor)
            )
            for doc, version, sha, blob in rows:
                found[(doc, int(version))] = (sha, common_pb2.LedgerAnchor.FromString(blob))
        return found

    async def put_anchor(
        self, key: VersionKey, sha256: str, anchor: common_pb2.LedgerAnchor
    ) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    delete(AnchorRow).where(
                        AnchorRow.document_id == key[0], AnchorRow.version == key[1]
                    )
                )
                await conn.execute(
                    insert(AnchorRow),
                    {
                        "document_id": key[0],
                        "version": key[1],
                        "sha256": sha256,
                        "anchor": anchor.SerializeToString(),
                    },
                )
        except OperationalError as exc:
            raise Unavailable(f"retrieval database unavailable: {exc.orig}") from exc

"""The embedded backend: an HNSW graph (usearch) plus columns of filter fields in memory.

Durability: every write goes to the service's database (``chunks``) before it returns;
the in-memory state is rebuilt from those rows at start. The graph is the one costly
part to rebuild, so it is snapshotted to ``data_dir`` (at most every
``snapshot_interval_seconds`` while it changes, and at stop) together with the
database generation it reflects; a snapshot of another generation is ignored and the
graph rebuilt from the rows.

Filtered search: a filter is turned into a boolean mask over slots from per-value
posting lists (OR within a field, AND across fields). If it leaves few chunks
(``exact_threshold``, or fewer than a graph walk would cost), those vectors are
scanned exactly; otherwise the graph is
searched for enough extra candidates to expect ``k`` survivors, and an exact scan
covers the rare case where too few survive. Either way a result always passes its
filter, and a selective filter costs a small scan instead of a graph walk that finds
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from usearch.index import Index

from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.services.retrieval.model import (
    VALUE_FIELDS,
    ChunkRecord,
    Filter,
    Hit,
    VersionKey,
)
from ledgerlens.services.retrieval.settings import LocalIndexSettings
from ledgerlens.services.retrieval.store import Store, StoredChunk

__all__ = ["LocalBackend"]

log = logging.getLogger(__name__)


class _Postings:
    """value -> slots, with the numpy array of each value built once per change."""

    def __init__(self) -> None:
        self._lists: dict[str, list[int]] = defaultdict(list)
        self._arrays: dict[str, npt.NDArray[np.int64]] = {}

    def add(self, value: str, slot: int) -> None:
        self._lists[value].append(slot)
        self._arrays.pop(value, None)

    def discard(self, value: str, slot: int) -> None:
        slots = self._lists.get(value)
        if slots is None:
            return
        with contextlib.suppress(ValueError):
            slots.remove(slot)
        self._arrays.pop(value, None)
        if not slots:
            del self._lists[value]

    def values(self) -> list[str]:
        return list(self._lists)

    def slots(self, value: str) -> npt.NDArray[np.int64] | None:
        array = self._arrays.get(value)
        if array is None:
            found = self._lists.get(value)
            if not found:
                return None
            array = self._arrays[value] = np.fromiter(found, dtype=np.int64, count=len(found))
        return array


class LocalBackend:
    name = "local"

    def __init__(
        self, store: Store, data_dir: str | Path, dimensions: int, settings: LocalIndexSettings
    ) -> None:
        self._store = store
        self._dir = Path(data_dir) / "hnsw"
        self._dim = dimensions
        self._settings = settings
        self._ann = self._new_graph()
        self._slot_of: dict[str, int] = {}
        self._records: dict[int, ChunkRecord] = {}
        self._by_version: dict[VersionKey, set[int]] = defaultdict(set)
        self._postings = {name: _Postings() for name in VALUE_FIELDS}
        self._capacity = 0
        self._vectors = np.zeros((0, dimensions), dtype=np.float32)
        self._alive = np.zeros(0, dtype=bool)
        self._doc_type = np.zeros(0, dtype=np.int16)
        self._published = np.zeros(0, dtype=np.float64)
        #: chunk id by slot (None where free), so a search maps slots to ids in one step
        self._chunk_ids = np.full(0, None, dtype=object)
        self._next_slot = 1
        self._generation = 0
        self._saved_generation = -1
        self._write_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._snapshot_task: asyncio.Task[None] | None = None

    def _new_graph(self) -> Index:
        return Index(
            ndim=self._dim,
            metric="cos",
            dtype=self._settings.graph_dtype,
            connectivity=self._settings.connectivity,
            expansion_add=self._settings.expansion_add,
            expansion_search=self._settings.expansion_search,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._generation = await self._store.generation()
        self._next_slot = await self._store.max_slot() + 1
        self._grow(self._next_slot)
        slots: list[int] = []
        async for slot, _chunk_id, chunk, vector in self._store.iter_chunks():
            record = ChunkRecord.from_chunk(
                retrieval_pb2.Chunk.FromString(chunk), np.frombuffer(vector, dtype=np.float32)
            )
            self._place(slot, record)
            slots.append(slot)
        if not await asyncio.to_thread(self._load_snapshot, len(slots)):
            log.info("rebuilding the HNSW graph from %d stored chunks", len(slots))
            if slots:
                keys = np.asarray(slots, dtype=np.uint64)
                vectors = self._vectors[keys.astype(np.int64)]
                await asyncio.to_thread(self._ann.add, keys, vectors, threads=0)
            await asyncio.to_thread(self._save_snapshot, self._generation)
        self._snapshot_task = asyncio.create_task(self._snapshots(), name="hnsw-snapshots")

    async def stop(self) -> None:
        # the snapshot loop is told to end, not cancelled: a cancel would not stop a save
        # already running in its worker thread, and the final save below would race it
        self._stopping.set()
        if self._snapshot_task is not None:
            await self._snapshot_task
            self._snapshot_task = None
        async with self._write_lock:
            if self._saved_generation != self._generation:
                await asyncio.to_thread(self._save_snapshot, self._generation)

    def _paths(self) -> tuple[Path, Path]:
        return self._dir / "graph.usearch", self._dir / "graph.json"

    def _load_snapshot(self, expected: int) -> bool:
        graph, meta = self._paths()
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            return False
        if (
            info.get("generation") != self._generation
            or info.get("size") != expected
            or info.get("dtype", "f32") != self._settings.graph_dtype
        ):
            log.info("HNSW snapshot is stale (%s vs generation %d)", info, self._generation)
            return False
        try:
            self._ann.load(str(graph))
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("HNSW snapshot unreadable (%r); rebuilding", exc)
            self._ann = self._new_graph()
            return False
        if len(self._ann) != expected:
            self._ann = self._new_graph()
            return False
        self._saved_generation = self._generation
        log.info("loaded HNSW snapshot of %d chunks (generation %d)", expected, self._generation)
        return True

    def _save_snapshot(self, generation: int) -> None:
        graph, meta = self._paths()
        size = len(self._ann)
        tmp_graph = graph.with_name(graph.name + ".tmp")
        self._ann.save(str(tmp_graph))
        os.replace(tmp_graph, graph)
        tmp_meta = meta.with_name(meta.name + ".tmp")
        tmp_meta.write_text(
            json.dumps(
                {"generation": generation, "size": size, "dtype": self._settings.graph_dtype}
            )
        )
        os.replace(tmp_meta, meta)
        self._saved_generation = generation

    async def _snapshots(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), self._settings.snapshot_interval_seconds
                )
            if self._stopping.is_set():
                return
            async with self._write_lock:
                if self._saved_generation != self._generation:
                    try:
                        await asyncio.to_thread(self._save_snapshot, self._generation)
                    except OSError as exc:  # the rows are durable; a snapshot can wait
                        log.warning("HNSW snapshot failed: %r", exc)

    # -- in-memory state ---------------------------------------------------------------

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, self._capacity * 2, 1024)
        vectors = np.zeros((capacity, self._dim), dtype=np.float32)
        vectors[: self._capacity] = self._vectors
        alive = np.zeros(capacity, dtype=bool)
        alive[: self._capacity] = self._alive
        doc_type = np.zeros(capacity, dtype=np.int16)
        doc_type[: self._capacity] = self._doc_type
        published = np.full(capacity, np.nan)
        published[: self._capacity] = self._published
        chunk_ids = np.full(capacity, None, dtype=object)
        chunk_ids[: self._capacity] = self._chunk_ids
        # each array is replaced whole, so a concurrent search sees old or new, not half
        self._vectors, self._alive, self._doc_type, self._published, self._chunk_ids = (
            vectors,
            alive,
            doc_type,
            published,
            chunk_ids,
        )
        self._capacity = capacity

    def _place(self, slot: int, record: ChunkRecord) -> None:
        self._slot_of[record.chunk_id] = slot
        self._chunk_ids[slot] = record.chunk_id
        self._records[slot] = record
        self._by_version[record.key].add(slot)
        self._vectors[slot] = record.vector
        self._doc_type[slot] = record.doc_type
        self._published[slot] = np.nan if record.published_at is None else record.published_at
        for name, values in record.field_values().items():
            for value in values:
                self._postings[name].add(value, slot)
        self._alive[slot] = True

    def _unplace(self, slot: int) -> None:
        record = self._records.pop(slot, None)
        self._alive[slot] = False
        self._chunk_ids[slot] = None
        if record is None:
            return
        self._slot_of.pop(record.chunk_id, None)
        version_slots = self._by_version.get(record.key)
        if version_slots is not None:
            version_slots.discard(slot)
            if not version_slots:
                del self._by_version[record.key]
        for name, values in record.field_values().items():
            for value in values:
                self._postings[name].discard(value, slot)

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
        async with self._write_lock:
            unique = {r.chunk_id: r for r in records}
            slots = {cid: self._slot_of.get(cid) for cid in unique}
            fresh = [cid for cid, slot in slots.items() if slot is None]
            for offset, cid in enumerate(fresh):
                slots[cid] = self._next_slot + offset
            rows: list[StoredChunk] = []
            keys: list[VersionKey] = []
            for cid, record in unique.items():
                slot = slots[cid]
                assert slot is not None
                rows.append((slot, cid, record.chunk.SerializeToString(), record.vector.tobytes()))
                keys.append(record.key)
            self._generation = await self._store.replace_chunks(rows, keys)
            self._next_slot += len(fresh)
            self._grow(self._next_slot)
            replaced = np.asarray(
                [slots[cid] for cid in unique if cid not in fresh], dtype=np.uint64
            )
            for cid, record in unique.items():
                slot = slots[cid]
                assert slot is not None
                if cid not in fresh:
                    self._unplace(slot)
                self._place(slot, record)
            keys_array = np.asarray([slots[cid] for cid in unique], dtype=np.uint64)
            vectors = np.stack([r.vector for r in unique.values()])
            await asyncio.to_thread(self._add_to_graph, replaced, keys_array, vectors)

    def _add_to_graph(
        self,
        replaced: npt.NDArray[np.uint64],
        keys: npt.NDArray[np.uint64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        if replaced.size:
            self._ann.remove(replaced)
        self._ann.add(keys, vectors, threads=1)

    async def remove_versions(self, keys: Sequence[VersionKey]) -> int:
        if not keys:
            return 0
        async with self._write_lock:
            slots, self._generation = await self._store.delete_versions(keys)
            in_memory = {s for key in keys for s in self._by_version.get(key, ())}
            gone = sorted(set(slots) | in_memory)
            for slot in gone:
                self._unplace(slot)
            if gone:
                graph_keys = np.asarray(gone, dtype=np.uint64)
                await asyncio.to_thread(self._ann.remove, graph_keys)
            return len(gone)

    # -- reads -------------------------------------------------------------------------

    async def count(self) -> int:
        return len(self._records)

    async def get(self, chunk_ids: Sequence[str]) -> dict[str, ChunkRecord]:
        found: dict[str, ChunkRecord] = {}
        for cid in chunk_ids:
            slot = self._slot_of.get(cid)
            if slot is not None:
                record = self._records.get(slot)
                if record is not None:
                    found[cid] = record
        return found

    async def records(self) -> AsyncIterator[ChunkRecord]:
        for record in list(self._records.values()):
            yield record

    def memory_bytes(self) -> int | None:
        """The graph plus the vector and filter columns (not the chunk texts)."""
        columns = self._vectors.nbytes + self._alive.nbytes
        columns += self._doc_type.nbytes + self._published.nbytes
        return int(self._ann.memory_usage) + columns

    def graph_memory_bytes(self) -> int:
        return int(self._ann.memory_usage)

    async def search(
        self,
        vector: npt.NDArray[np.float32],
        flt: Filter,
        k: int,
        *,
        at_least: int | None = None,
    ) -> list[Hit]:
        return self.search_now(vector, flt, k, at_least=at_least)

    def search_now(
        self,
        vector: npt.NDArray[np.float32],
        flt: Filter,
        k: int,
        *,
        at_least: int | None = None,
    ) -> list[Hit]:
        """The search itself, synchronous (well under a millisecond for ``k`` up to 100).

        Under a filter that leaves many chunks, the graph walk that finds ``k`` survivors
        grows as ``k / selectivity``; with ``at_least`` the walk stops at
        ``max_graph_candidates`` once it has yielded ``at_least`` survivors, so fewer
        than ``k`` may come back (fusion uses what a cheap walk finds beyond the top).
        """
        total = len(self._records)
        if total == 0 or k <= 0:
            return []
        query = np.asarray(vector, dtype=np.float32)
        if flt.empty:
            return self._graph_search(query, min(self._oversampled(k), total), None)[:k]
        mask = self.mask(flt)
        selected = np.flatnonzero(mask)
        if selected.size == 0:
            return []
        needed = min(k if at_least is None else max(1, min(at_least, k)), selected.size)
        share = selected.size / total
        # twice the graph results that should hold the survivors wanted
        count = min(total, int(k / share * 2) + k)
        if needed < k:
            floor = int(needed / share * 2) + needed
            count = min(count, max(floor, self._settings.max_graph_candidates))
        # a graph walk yielding one result costs about as much as scanning 16 vectors
        # (measured here with usearch and numpy): scan when that is the cheaper way
        if selected.size <= max(self._settings.exact_threshold, 16 * count):
            return self._exact(query, selected, k)
        # an unlucky walk (survivors cluster away from the query) widens twice before the
        # exact scan, which costs as much as a walk of several thousand results
        for _ in range(3):
            hits = self._graph_search(query, count, mask)
            if len(hits) >= needed:
                return hits[:k]
            if count >= total:
                break
            count = min(total, count * 2)
        return self._exact(query, selected, k)

    def exact_search(self, vector: npt.NDArray[np.float32], flt: Filter, k: int) -> list[Hit]:
        """Brute force over every chunk passing ``flt`` (the ground truth for recall)."""
        mask = self.mask(flt) if not flt.empty else self._alive.copy()
        return self._exact(np.asarray(vector, dtype=np.float32), np.flatnonzero(mask), k)

    def _oversampled(self, k: int) -> int:
        """How many graph results to re-score exactly for the best ``k``: a quantised
        graph's order is approximate near the cut, so it is asked for more (as many as
        its search beam holds anyway, and at least twice ``k``)."""
        if self._settings.graph_dtype == "f32":
            return k
        return max(2 * k, self._settings.expansion_search)

    def _graph_search(
        self, query: npt.NDArray[np.float32], count: int, mask: npt.NDArray[np.bool_] | None
    ) -> list[Hit]:
        # The graph proposes candidates at its own precision; the survivors are scored
        # exactly (the same dot product as _exact) and ordered by that score.
        matches = self._ann.search(query, count)
        keys = np.asarray(matches.keys, dtype=np.int64)
        alive = self._alive if mask is None else mask
        keys = keys[keys < alive.shape[0]]
        keys = keys[alive[keys]]
        if keys.size == 0:
            return []
        scores = self._vectors[keys] @ query
        order = np.argsort(-scores, kind="stable")
        return list(map(Hit, self._chunk_ids[keys[order]].tolist(), scores[order].tolist()))

    def _exact(
        self, query: npt.NDArray[np.float32], selected: npt.NDArray[np.int64], k: int
    ) -> list[Hit]:
        if selected.size == 0:
            return []
        scores = self._vectors[selected] @ query
        take = min(k, selected.size)
        top = np.argpartition(-scores, take - 1)[:take]
        top = top[np.argsort(-scores[top], kind="stable")]
        return list(map(Hit, self._chunk_ids[selected[top]].tolist(), scores[top].tolist()))

    def mask(self, flt: Filter) -> npt.NDArray[np.bool_]:
        """Slots passing ``flt`` (and alive), as a boolean array over all slots."""
        mask = self._alive.copy()
        for name, values in flt.value_sets():
            mask &= self._any_of(name, values)
        if flt.doc_types:
            mask &= np.isin(self._doc_type, np.fromiter(flt.doc_types, dtype=np.int16))
        if flt.has_date_range:
            published = self._published
            with np.errstate(invalid="ignore"):  # NaN (no date) compares False: excluded
                if flt.published_after is not None:
                    mask &= published >= flt.published_after
                if flt.published_before is not None:
                    mask &= published < flt.published_before
                mask &= ~np.isnan(published)
        if flt.source_url_prefix:
            prefix = flt.source_url_prefix
            urls = self._postings["source_url"]
            mask &= self._any_of("source_url", [u for u in urls.values() if u.startswith(prefix)])
        return mask

    def _any_of(self, name: str, values: Iterable[str]) -> npt.NDArray[np.bool_]:
        hit = np.zeros(self._capacity, dtype=bool)
        postings = self._postings[name]
        for value in values:
            slots = postings.slots(value)
            if slots is not None:
                hit[slots] = True
        return hit

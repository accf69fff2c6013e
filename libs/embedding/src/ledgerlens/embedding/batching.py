"""One embedding queue per service: concurrent callers share model batches.

A document of a few chunks embedded on its own leaves the model mostly idle between
tiny batches; bulk ingest keeps several documents in flight and this queue packs
their chunks into full batches, so the model (not the plumbing) sets the pace.
Nothing in the embedding libraries batches across callers, hence this small class.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence

from ledgerlens.embedding import Embedder

__all__ = ["EmbeddingQueue"]


class EmbeddingQueue:
    def __init__(self, embedder: Embedder, *, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.embedder = embedder
        self.batch_size = batch_size
        self._pending: deque[tuple[str, asyncio.Future[list[float]]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="embedding-queue")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.cancel()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Vectors of ``texts`` in order; raises what the embedder raised."""
        if self._task is None:
            raise RuntimeError("embedding queue is not started")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        self._pending.extend(zip(texts, futures, strict=True))
        self._wakeup.set()
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:
            for future in futures:  # what is still queued is skipped, not embedded
                future.cancel()
            raise
        vectors: list[list[float]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            vectors.append(result)
        return vectors

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch: list[tuple[str, asyncio.Future[list[float]]]] = []
                while self._pending and len(batch) < self.batch_size:
                    item = self._pending.popleft()
                    if not item[1].done():  # its caller gave up
                        batch.append(item)
                if not batch:
                    continue
                try:
                    vectors = await self.embedder.embed([text for text, _ in batch])
                except Exception as exc:  # noqa: BLE001  (handed to every caller, who reports it)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    if not future.done():
                        future.set_result(vector)

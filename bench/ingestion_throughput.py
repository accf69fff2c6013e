"""Ingestion end to end vs the embedding model alone, on the same EIP chunks, one run.

*raw*: the EIPs are parsed and chunked exactly as the service does (untimed), then the
model embeds the chunks' texts in batches, in this process: what the model can do.
*pipeline*: the ingestion service runs as its own process (``python -m
ledgerlens.services.ingestion``: SQLite, outbox relay to a private nats-server) and
this process streams the same EIP files through ``IngestStream`` and waits for every
acknowledgement (each one means the document, its chunks and events are committed).
The target: the pipeline's chunks/s is at least 70% of raw (the model, not the
plumbing, sets the pace).

A sample of the corpus (every k-th EIP, ``--docs``, default 120) keeps the run to a few
minutes on two CPUs: the model embeds about 20 chunks of 200 tokens a second here.

Run alone: ``python bench/ingestion_throughput.py [--docs 120]``; ``make bench`` runs
it through ``bench/run.py``. Prints / returns JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
from _common import grpc_address, start_service

from ledgerlens.ingestion.v1 import ingestion_pb2, ingestion_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.70


def _corpus(docs: int) -> list[Path]:
    explicit = os.environ.get("LEDGERLENS_CORPUS_DIR")
    root = Path(explicit) if explicit else REPO.parent / "shared" / "corpus" / "eips"
    files = sorted(root.glob("eip-*.md"))
    if not files:
        raise SystemExit(f"no EIPs under {root} (set LEDGERLENS_CORPUS_DIR)")
    step = max(1, len(files) // docs)
    return files[::step][:docs]


def _raw(files: list[Path]) -> dict[str, Any]:
    from ledgerlens.embedding import LocalEmbedder
    from ledgerlens.services.ingestion.ingest import chunk_prepared, prepare
    from ledgerlens.services.ingestion.model import IngestRequest
    from ledgerlens.services.ingestion.settings import Settings

    settings = Settings()  # the service's defaults: the same chunks as the pipeline
    embedder = LocalEmbedder.load(batch_size=settings.embedding.batch_size)
    try:
        texts: list[str] = []
        for path in files:
            request = IngestRequest(source_url=f"file://{path}", content=path.read_bytes())
            chunks = chunk_prepared(
                prepare(request),
                embedder.tokenizer,
                max_tokens=min(settings.chunk_max_tokens, embedder.max_tokens),
                overlap_tokens=settings.chunk_overlap_tokens,
            )
            texts += [c.embedding_text for c in chunks]

        async def embed_all() -> float:
            await embedder.embed(texts[:8])  # warm-up: first call allocates
            started = time.perf_counter()
            for i in range(0, len(texts), embedder.batch_size):
                await embedder.embed(texts[i : i + embedder.batch_size])
            return time.perf_counter() - started

        seconds = asyncio.run(embed_all())
    finally:
        embedder.close()
    return {
        "chunks": len(texts),
        "seconds": round(seconds, 2),
        "chunks_per_second": round(len(texts) / seconds, 2),
        "batch_size": embedder.batch_size,
    }


async def _pipeline(files: list[Path], nats_url: str, workdir: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "LEDGERLENS_INGESTION_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'ingestion.db'}",
        "LEDGERLENS_INGESTION_DATA_DIR": str(workdir / "data"),
        "LEDGERLENS_INGESTION_NATS_URL": nats_url,
        "LEDGERLENS_INGESTION_GRPC_PORT": "0",
        "LEDGERLENS_INGESTION_HTTP_PORT": "0",
        "LEDGERLENS_INGESTION_AUTH__ENABLED": "false",
    }
    proc, line = await start_service(
        "ledgerlens.services.ingestion", env, workdir / "ingestion.log", within=300
    )
    try:
        address = grpc_address(line)

        async def feed() -> AsyncIterator[ingestion_pb2.IngestStreamRequest]:
            for path in files:
                yield ingestion_pb2.IngestStreamRequest(
                    correlation_id=path.name,
                    document=ingestion_pb2.IngestDocumentRequest(
                        source_url=f"file://{path}", content=path.read_bytes()
                    ),
                )

        chunks = 0
        failed = 0
        async with grpc.aio.insecure_channel(address) as channel:
            stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
            await stub.ListDocuments(ingestion_pb2.ListDocumentsRequest(), timeout=60)  # ready
            started = time.perf_counter()
            async for response in stub.IngestStream(feed(), timeout=3600):
                if response.HasField("error"):
                    failed += 1
                else:
                    chunks += response.result.chunk_count
            seconds = time.perf_counter() - started
    finally:
        proc.terminate()
        await proc.wait()
    return {
        "docs": len(files),
        "failed": failed,
        "chunks": chunks,
        "seconds": round(seconds, 2),
        "docs_per_second": round(len(files) / seconds, 2),
        "chunks_per_second": round(chunks / seconds, 2),
    }


def main(docs: int = 120) -> dict[str, Any]:
    from ledgerlens.runtime.testing import PrivateNatsServer

    files = _corpus(docs)
    raw = _raw(files)
    with tempfile.TemporaryDirectory(prefix="ledgerlens-bench-") as tmp:
        nats = PrivateNatsServer(store_dir=Path(tmp) / "nats").start()
        try:
            pipeline = asyncio.run(_pipeline(files, nats.url, Path(tmp)))
        finally:
            nats.stop()
    ratio = pipeline["chunks_per_second"] / raw["chunks_per_second"]
    return {
        "corpus": f"{len(files)} EIPs (every {max(1, 949 // docs)}th of 949)",
        "model": "all-MiniLM-L6-v2 (CPU)",
        "cpus": os.cpu_count(),
        "raw_embedding": raw,
        "pipeline": pipeline,
        "same_chunks": raw["chunks"] == pipeline["chunks"],
        "pipeline_vs_raw": round(ratio, 3),
        "target": {"pipeline_vs_raw_min": TARGET_RATIO},
        "met": ratio >= TARGET_RATIO and raw["chunks"] == pipeline["chunks"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=120, help="EIPs in the sample")
    args = parser.parse_args()
    print(json.dumps(main(args.docs), indent=2))

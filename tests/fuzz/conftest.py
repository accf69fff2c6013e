"""Fixtures of the fuzz tests: the five services running once for the session."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from _fuzz_stack import FuzzStack

from ledgerlens.embedding.testing import CachingEmbedder


@pytest.fixture(scope="session")
def fuzz_stack(
    nats_url: str, cached_embedder: CachingEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzStack]:
    """identity, ingestion, retrieval, inference and ledger with auth on, real NATS,
    SQLite files, a seed document indexed and anchored (see ``_fuzz_stack``)."""
    started = time.monotonic()
    stack = FuzzStack(nats_url, cached_embedder, tmp_path_factory.mktemp("fuzz-stack")).start()
    print(f"fuzz stack started in {time.monotonic() - started:.1f}s")
    try:
        yield stack
    finally:
        stack.stop()

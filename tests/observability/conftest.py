"""Fixtures of the observability tests: the running services' ``/metrics``."""

from __future__ import annotations

import secrets
import time

import pytest
from _stack import Exposition, run_in_thread, run_stack_and_scrape

from ledgerlens.embedding.testing import CachingEmbedder
from ledgerlens.runtime.testing import EventNames, delete_streams


@pytest.fixture(scope="session")
def exposition(
    nats_url: str, cached_embedder: CachingEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> Exposition:
    """The five services' ``/metrics`` after one document went through them."""
    names = EventNames(secrets.token_hex(4))
    tmp = tmp_path_factory.mktemp("observability-stack")
    started = time.monotonic()
    try:
        texts = run_in_thread(run_stack_and_scrape(nats_url, cached_embedder, tmp, names))
    finally:
        run_in_thread(delete_streams(nats_url, names))
    print(f"observability stack ran in {time.monotonic() - started:.1f}s")
    return Exposition.parse(texts, names)

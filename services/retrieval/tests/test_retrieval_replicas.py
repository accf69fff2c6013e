"""Replicas: each reads every event through durables of its own, named after it (a pod
name fits), which the server deletes once unused; the platform's durables are kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import nats.js.errors
import pytest
import pytest_asyncio
from nats.js import JetStreamManager
from pydantic import ValidationError

from ledgerlens.runtime.events import EventBus
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.retrieval.app import RETRIEVAL_CONSUMERS, replica_consumer
from ledgerlens.services.retrieval.settings import Settings

POD = "ledgerlens-retrieval-7d9f8c6b5-x2k4q"


@pytest.fixture
def backend() -> str:
    # the consumers do not depend on the backend
    return "local"


@pytest_asyncio.fixture
async def jsm(nats_url: str) -> AsyncIterator[JetStreamManager]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jsm()
    finally:
        await nc.close()


@pytest.mark.parametrize("replica", [POD, "r1", "a" * 63, "0", ""])
def test_replica_accepts_a_pod_name(replica: str) -> None:
    assert Settings(replica=replica).replica == replica


@pytest.mark.parametrize("replica", ["Bad_Name", "-r1", "r1-", "a.b", "a" * 64, "r 1"])
def test_replica_rejects_what_is_not_a_dns_label(replica: str) -> None:
    with pytest.raises(ValidationError, match="replica"):
        Settings(replica=replica)


def test_replica_consumer_idle_seconds_default_and_bounds() -> None:
    assert Settings().replica_consumer_idle_seconds == 3600.0
    with pytest.raises(ValidationError, match="replica_consumer_idle_seconds"):
        Settings(replica_consumer_idle_seconds=0)


def test_only_a_replicas_durables_get_the_threshold() -> None:
    spec = RETRIEVAL_CONSUMERS[0]
    assert spec.inactive_threshold_seconds is None
    assert replica_consumer(spec, "", 60.0) == spec
    mine = replica_consumer(spec, POD, 60.0)
    assert mine.durable == spec.durable.replace("retrieval--", f"retrieval-{POD}--")
    assert mine.inactive_threshold_seconds == 60.0
    assert mine.to_config().as_dict()["inactive_threshold"] == 60 * 10**9  # ns on the wire
    assert "inactive_threshold" not in spec.to_json()


@pytest.mark.integration
@pytest.mark.parametrize("replica", [POD, ""])
async def test_the_service_declares_its_durables_on_the_server(
    start_retrieval: Callable[..., Any],
    event_names: EventNames,
    jsm: JetStreamManager,
    replica: str,
) -> None:
    async with start_retrieval(replica=replica, replica_consumer_idle_seconds=90):
        for platform in RETRIEVAL_CONSUMERS:
            spec = event_names.consumer(platform)
            durable = replica_consumer(spec, replica).durable
            info = await jsm.consumer_info(spec.stream, durable)
            assert info.config.durable_name == durable
            if replica:
                assert durable.startswith(f"retrieval-{POD}--")
                assert info.config.inactive_threshold == pytest.approx(90.0)
            else:
                assert durable.startswith("retrieval--")
                assert not info.config.inactive_threshold


@pytest.mark.integration
async def test_the_server_deletes_an_idle_replica_durable_and_keeps_the_platforms(
    event_bus: EventBus, event_names: EventNames, jsm: JetStreamManager
) -> None:
    platform = event_names.consumer(RETRIEVAL_CONSUMERS[0])
    # the longest name a replica gets: a 63-character pod name
    mine = replica_consumer(platform, "p" * 63, idle_seconds=1.0)
    await event_bus.ensure_stream(event_names.platform_streams()["INGESTION"])
    await event_bus.ensure_consumer(platform)
    await event_bus.ensure_consumer(mine)
    assert (await jsm.consumer_info(mine.stream, mine.durable)).config.durable_name == mine.durable

    deadline = asyncio.get_running_loop().time() + 15.0
    while True:
        try:
            await jsm.consumer_info(mine.stream, mine.durable)
        except nats.js.errors.NotFoundError:
            break
        assert asyncio.get_running_loop().time() < deadline, "idle durable was not deleted"
        await asyncio.sleep(0.25)
    info = await jsm.consumer_info(platform.stream, platform.durable)
    assert not info.config.inactive_threshold

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from kv_chaincode import KeyValueChaincode

from ledgerlens.fabric import Gateway, RetryPolicy, Timeouts, connect
from ledgerlens.fabric.identity import ECDSASigner, Identity
from ledgerlens.fabric.testing import TestPeer, new_test_identity

# the peer restarts on the same port in some tests; reconnect quickly
FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200))


@pytest.fixture
async def peer() -> AsyncIterator[TestPeer]:
    async with TestPeer(
        organizations=["Org1MSP", "Org2MSP"], chaincodes=[KeyValueChaincode()]
    ) as started:
        yield started


@pytest.fixture(scope="session")
def client_identity() -> tuple[Identity, ECDSASigner, bytes]:
    return new_test_identity("Org1MSP", "client")


@pytest.fixture
async def gateway(
    peer: TestPeer, client_identity: tuple[Identity, ECDSASigner, bytes]
) -> AsyncIterator[Gateway]:
    identity, signer, _ = client_identity
    async with Gateway(
        connect(peer.address, options=FAST_RECONNECT),
        identity,
        signer,
        timeouts=Timeouts(evaluate=5, endorse=5, submit=5, commit_status=5),
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05),
    ) as gw:
        yield gw

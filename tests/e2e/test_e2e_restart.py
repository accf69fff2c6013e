"""``make up`` again after a stop keeps the data: the whole platform, stopped and started
again on the same data dir, still knows the key, finds every document exactly once, and
shows the same anchors; ingesting the same files again changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from _faults_support import check_exactly_once, eip_subsets, expected_from, open_clients
from _platform import ingest_files, start_platform

from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.ledger.v1 import ledger_pb2

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("corpus"),
]

SCOPES = ["ingest:write", "ingest:read", "search:read", "ledger:read"]
SOURCE = "https://restart.example/eips/"
SETTLE_SECONDS = 150.0


async def test_a_restarted_platform_keeps_keys_documents_and_anchors(tmp_path: Path) -> None:
    # a handful of EIPs is enough: what is checked is that nothing is lost or repeated
    (docs,) = eip_subsets(5)
    data_dir = tmp_path / "stack"

    with start_platform(data_dir) as first:
        key = first.bootstrap_key("acme", SCOPES, "restart")
        token = first.token(key)
        async with open_clients(first, token) as clients:
            expected = expected_from(
                await ingest_files(clients.ingestion, docs, source_prefix=SOURCE)
            )
            await check_exactly_once(
                first, clients, expected, within=SETTLE_SECONDS, what="before the stop"
            )
            anchors = {
                name: (await clients.ledger.VerifyDocument(_verify(one.sha256)))
                .records[0]
                .anchor.tx_id
                for name, one in expected.items()
            }
    # every process stopped here; the same data dir again, as `make up` after `make down`

    with start_platform(data_dir) as second:
        token = second.token(key)  # identity still knows the key
        async with open_clients(second, token) as clients:
            await check_exactly_once(
                second, clients, expected, within=SETTLE_SECONDS, what="after the restart"
            )
            for name, one in expected.items():
                answer = await clients.ledger.VerifyDocument(_verify(one.sha256))
                assert [r.anchor.tx_id for r in answer.records] == [anchors[name]], name
            again = await ingest_files(clients.ingestion, docs, source_prefix=SOURCE)
            for path, response in again.items():
                assert response.result.status == ingestion_pb2.INGEST_STATUS_UNCHANGED, path
                assert response.result.document_id == expected[path.name].document_id
            await check_exactly_once(
                second, clients, expected, within=SETTLE_SECONDS, what="after ingesting again"
            )


def _verify(sha256: str) -> ledger_pb2.VerifyDocumentRequest:
    return ledger_pb2.VerifyDocumentRequest(sha256=sha256)

"""The embedded dev ledger: Fabric's endorse / order / commit / deliver flow on one
machine, with hash-chained blocks persisted in SQLite or PostgreSQL.

    await migrate(database_url)
    ledger = await DevLedger.open(create_engine(database_url), [AnchoringContract()])
    endorsement = await ledger.simulate("anchoring", "AnchorDocument", args)
    block = await ledger.commit([endorsement])
    async for event in ledger.events(start_block=0): ...
"""

from ledgerlens.services.ledger.devledger.blocks import (
    ChaincodeEventData,
    Endorsement,
    KVRead,
    KVWrite,
    RangeRead,
    ReadWriteSet,
)
from ledgerlens.services.ledger.devledger.engine import (
    Checkpoint,
    CommittedBlock,
    DevLedger,
    EndorsementRefused,
    InvalidCheckpoint,
    LedgerCorruptedError,
    LedgerError,
    LedgerEvent,
    OutOfRange,
    StoredBlock,
    TxResult,
    TxStatus,
    UnknownChaincode,
    new_tx_id,
)
from ledgerlens.services.ledger.devledger.migrate import migrate

__all__ = [
    "ChaincodeEventData",
    "Checkpoint",
    "CommittedBlock",
    "DevLedger",
    "Endorsement",
    "EndorsementRefused",
    "InvalidCheckpoint",
    "KVRead",
    "KVWrite",
    "LedgerCorruptedError",
    "LedgerError",
    "LedgerEvent",
    "OutOfRange",
    "RangeRead",
    "ReadWriteSet",
    "StoredBlock",
    "TxResult",
    "TxStatus",
    "UnknownChaincode",
    "migrate",
    "new_tx_id",
]

"""ledgerlens-fabric: a Hyperledger Fabric Gateway client on the official protos.

``connect`` a channel, build a :class:`Gateway` with an enrolled :class:`Identity` and
its :class:`ECDSASigner`, then ``gateway.network(channel).contract(chaincode)``. See
the README for the flow, offline signing, events with checkpoints and the test peer
(:mod:`ledgerlens.fabric.testing`).
"""

from ledgerlens.fabric.client import (
    Commit,
    CommitStatus,
    Contract,
    Gateway,
    Network,
    Proposal,
    RetryPolicy,
    SubmitResult,
    Timeouts,
    Transaction,
)
from ledgerlens.fabric.connection import connect
from ledgerlens.fabric.errors import (
    ChaincodeEventsError,
    CommitError,
    CommitStatusError,
    CommitStatusTimeout,
    EndorseError,
    EndorseTimeout,
    EvaluateError,
    EvaluateTimeout,
    GatewayError,
    GatewayTimeout,
    SubmitError,
    SubmitTimeout,
)
from ledgerlens.fabric.events import (
    ChaincodeEvent,
    ChaincodeEventStream,
    Checkpoint,
    ReconnectPolicy,
)
from ledgerlens.fabric.identity import (
    ECDSASigner,
    Identity,
    Signer,
    load_identity,
    load_signer,
)

__all__ = [
    "ChaincodeEvent",
    "ChaincodeEventStream",
    "ChaincodeEventsError",
    "Checkpoint",
    "Commit",
    "CommitError",
    "CommitStatus",
    "CommitStatusError",
    "CommitStatusTimeout",
    "Contract",
    "ECDSASigner",
    "EndorseError",
    "EndorseTimeout",
    "EvaluateError",
    "EvaluateTimeout",
    "Gateway",
    "GatewayError",
    "GatewayTimeout",
    "Identity",
    "Network",
    "Proposal",
    "ReconnectPolicy",
    "RetryPolicy",
    "Signer",
    "SubmitError",
    "SubmitResult",
    "SubmitTimeout",
    "Timeouts",
    "Transaction",
    "connect",
    "load_identity",
    "load_signer",
]

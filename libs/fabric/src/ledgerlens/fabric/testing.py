"""A Fabric Gateway peer for tests: the real protocol over real gRPC, no Fabric needed.

:class:`TestPeer` serves the official ``gateway.Gateway`` service on 127.0.0.1 and
behaves, at the protocol level, like a Fabric peer with its gateway and an orderer:

* it checks what a peer checks: the tx id is SHA-256(nonce || creator), every
  signature verifies against the creator certificate carried in the message, and is
  low-S (high-S is rejected, as Fabric's MSP does); the creator's MSP must be one of
  the channel's organisations;
* it runs :class:`~ledgerlens.fabric.chaincode.Chaincode` objects over a versioned world
  state, recording real read/write sets, and returns real ``ProposalResponse``-based
  prepared transactions (``common.Envelope``), each organisation endorsing with its own
  key;
* it orders submitted transactions into numbered blocks and validates them with MVCC
  (a read whose version changed since endorsement is ``MVCC_READ_CONFLICT``, a range
  whose keys changed is ``PHANTOM_READ_CONFLICT``), then answers ``CommitStatus`` and
  streams ``ChaincodeEvents`` from any block, after any tx id.

Fault hooks (:meth:`TestPeer.refuse_endorsement`, :meth:`TestPeer.force_mvcc_conflicts`,
``commit_delay``, ``endorse_delay``, :meth:`TestPeer.stop` / :meth:`TestPeer.start` on
the same port with the ledger kept) let tests drive the client's error and recovery
paths.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.ledger.rwset import rwset_pb2
from fabric_protos.ledger.rwset.kvrwset import kv_rwset_pb2
from fabric_protos.peer import (
    chaincode_event_pb2,
    chaincode_pb2,
    proposal_pb2,
    proposal_response_pb2,
    transaction_pb2,
)
from google.protobuf.message import DecodeError

from ledgerlens.fabric import errors, protocol
from ledgerlens.fabric.chaincode import Chaincode, ChaincodeError
from ledgerlens.fabric.identity import ECDSASigner, Identity, digest, verify_signature
from ledgerlens.fabric.worldstate import (
    CommittedTransaction,
    InMemoryLedger,
    Ledger,
    Version,
    Write,
)

__all__ = ["Organization", "TestPeer", "new_test_identity"]


def new_test_identity(
    msp_id: str, common_name: str = "client"
) -> tuple[Identity, ECDSASigner, bytes]:
    """A fresh P-256 key and self-signed certificate: ``(identity, signer, key PEM)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, msp_id),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    identity = Identity(msp_id, certificate.public_bytes(serialization.Encoding.PEM))
    return identity, ECDSASigner(key), key_pem


@dataclass
class Organization:
    """One organisation of the channel: its MSP id, the address its peer is known by
    (what error details report) and the peer's endorsing identity."""

    msp_id: str
    address: str = ""
    identity: Identity = field(init=False)
    signer: ECDSASigner = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.address:
            self.address = f"peer0.{self.msp_id.lower()}.example.com:7051"
        self.identity, self.signer, _ = new_test_identity(self.msp_id, self.address)


class _Abort(Exception):
    """A request the peer refuses: becomes a gRPC status (with error details)."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)


class _Simulation:
    """The :class:`~ledgerlens.fabric.chaincode.ChaincodeStub` of one proposal: reads
    committed state and records versions; buffers writes (invisible until commit)."""

    def __init__(
        self, ledger: Ledger, namespace: str, contents: protocol.ProposalContents, msp_id: str
    ) -> None:
        self._ledger = ledger
        self._namespace = namespace
        self._contents = contents
        self._msp_id = msp_id
        self.reads: dict[str, Version | None] = {}
        self.ranges: list[tuple[str, str, list[tuple[str, Version]]]] = []
        self.writes: dict[str, bytes] = {}
        self.event: tuple[str, bytes] | None = None
        self.response = b""

    def get_tx_id(self) -> str:
        return self._contents.tx_id

    def get_tx_timestamp(self) -> int:
        return self._contents.timestamp

    def get_creator_msp_id(self) -> str:
        return self._msp_id

    def get_state(self, key: str) -> bytes | None:
        found = self._ledger.get_state(self._namespace, key)
        self.reads.setdefault(key, found[1] if found else None)
        return found[0] if found else None

    def put_state(self, key: str, value: bytes) -> None:
        self.writes[key] = bytes(value)

    def get_state_by_range(self, start_key: str, end_key: str) -> Iterable[tuple[str, bytes]]:
        rows = self._ledger.get_state_range(self._namespace, start_key, end_key)
        self.ranges.append((start_key, end_key, [(k, v) for k, _, v in rows]))
        return [(k, value) for k, value, _ in rows]

    def set_event(self, name: str, payload: bytes) -> None:
        self.event = (name, bytes(payload))

    def read_write_set(self) -> bytes:
        def version(v: Version | None) -> Any:
            return kv_rwset_pb2.Version(block_num=v.block, tx_num=v.tx) if v else None

        kv = kv_rwset_pb2.KVRWSet(
            reads=[kv_rwset_pb2.KVRead(key=k, version=version(v)) for k, v in self.reads.items()],
            range_queries_info=[
                kv_rwset_pb2.RangeQueryInfo(
                    start_key=start,
                    end_key=end,
                    itr_exhausted=True,
                    raw_reads=kv_rwset_pb2.QueryReads(
                        kv_reads=[kv_rwset_pb2.KVRead(key=k, version=version(v)) for k, v in rows]
                    ),
                )
                for start, end, rows in self.ranges
            ],
            writes=[kv_rwset_pb2.KVWrite(key=k, value=v) for k, v in sorted(self.writes.items())],
        )
        message = rwset_pb2.TxReadWriteSet(
            data_model=rwset_pb2.TxReadWriteSet.KV,
            ns_rwset=[
                rwset_pb2.NsReadWriteSet(namespace=self._namespace, rwset=kv.SerializeToString())
            ],
        )
        return bytes(message.SerializeToString())


@dataclass(frozen=True)
class _Submitted:
    tx_id: str
    envelope: bytes
    rwsets: tuple[tuple[str, Any], ...]  # (namespace, KVRWSet)
    event: Any | None


class TestPeer:
    """A Fabric Gateway peer (plus orderer) for one channel, on 127.0.0.1.

    ``organizations`` are MSP ids or :class:`Organization` objects; the first is the
    peer's own org (it evaluates). The endorsement policy is "every org named in the
    request's endorsing organizations, else every org". ``server_credentials`` makes the
    port TLS (``grpc.ssl_server_credentials``, with client auth for mutual TLS).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        *,
        channel: str = "mychannel",
        organizations: Sequence[str | Organization] = ("Org1MSP",),
        chaincodes: Sequence[Chaincode] = (),
        ledger: Ledger | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        if not organizations:
            raise ValueError("a channel needs at least one organization")
        self.channel = channel
        self.organizations = [
            o if isinstance(o, Organization) else Organization(o) for o in organizations
        ]
        self._orgs = {o.msp_id: o for o in self.organizations}
        self.chaincodes: dict[str, Chaincode] = {cc.name: cc for cc in chaincodes}
        self.ledger: Ledger = ledger if ledger is not None else InMemoryLedger()
        self.host = host
        self.port = port
        self._credentials = server_credentials
        self._server: grpc.aio.Server | None = None
        self._orderer: asyncio.Task[None] | None = None
        self._queue: list[_Submitted] = []
        self._queued = asyncio.Event()
        self._pending: set[str] = set()
        self._committed = asyncio.Condition()
        # fault injection
        self.commit_delay = 0.0  # seconds before each block is cut
        self.endorse_delay = 0.0  # seconds each Endorse/Evaluate call stalls
        self._refusals: dict[str, str] = {}
        self._forced_conflicts = 0

    # -- lifecycle -----------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> TestPeer:
        """Serves (again) on the same port; the ledger and pending transactions persist."""
        if self._server is not None:
            return self
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(_Servicer(self), server)
        target = f"{self.host}:{self.port}"
        if self._credentials is None:
            bound = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, self._credentials)
        if bound == 0:
            raise OSError(f"test peer could not bind {target}")
        self.port = bound
        await server.start()
        self._server = server
        self._orderer = asyncio.create_task(self._order_loop(), name="test-peer-orderer")
        return self

    async def stop(self, grace: float | None = None) -> None:
        """Stops serving (open streams are cut, as when a peer restarts)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        orderer, self._orderer = self._orderer, None
        if orderer is not None:
            orderer.cancel()
            await asyncio.gather(orderer, return_exceptions=True)

    async def __aenter__(self) -> TestPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- configuration and faults --------------------------------------------------
    def deploy(self, chaincode: Chaincode) -> None:
        self.chaincodes[chaincode.name] = chaincode

    def organization(self, msp_id: str) -> Organization:
        return self._orgs[msp_id]

    def refuse_endorsement(self, msp_id: str, message: str) -> None:
        """``msp_id``'s peer refuses every proposal with ``message`` until allowed."""
        if msp_id not in self._orgs:
            raise KeyError(f"unknown organization {msp_id}")
        self._refusals[msp_id] = message

    def allow_endorsement(self, msp_id: str) -> None:
        self._refusals.pop(msp_id, None)

    def force_mvcc_conflicts(self, count: int) -> None:
        """The next ``count`` transactions validated are marked MVCC_READ_CONFLICT."""
        self._forced_conflicts = count

    # -- checks a peer makes -------------------------------------------------------
    def _check_signed(self, message: bytes, signature: bytes, creator: bytes) -> Identity:
        try:
            identity = Identity.from_serialized(creator)
        except DecodeError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed creator: {exc}") from exc
        if identity.msp_id not in self._orgs:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"access denied: creator MSP {identity.msp_id!r} is not a member of channel "
                f"{self.channel!r}",
            )
        try:
            verify_signature(identity.certificate_pem, digest(message), signature)
        except (InvalidSignature, ValueError) as exc:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"access denied: signature verification failed for creator "
                f"{identity.msp_id}: {exc or 'invalid signature'}",
            ) from exc
        return identity

    def _check_channel(self, channel: str) -> None:
        if channel != self.channel:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"channel {channel!r} not found")

    def _check_proposal(
        self, signed: Any, request_tx_id: str, channel: str
    ) -> tuple[protocol.ProposalContents, Identity]:
        self._check_channel(channel)
        try:
            contents = protocol.read_proposal(signed.proposal_bytes)
        except (DecodeError, ValueError) as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed proposal: {exc}") from exc
        expected = protocol.transaction_id(contents.nonce, contents.creator)
        if contents.tx_id != expected or request_tx_id != expected:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid tx id {contents.tx_id!r}: expected {expected} "
                "(hex SHA-256 of nonce and creator)",
            )
        if contents.channel != channel:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "proposal channel mismatch")
        identity = self._check_signed(signed.proposal_bytes, signed.signature, contents.creator)
        return contents, identity

    # -- endorsement ---------------------------------------------------------------
    def _simulate(
        self, contents: protocol.ProposalContents, identity: Identity, orgs: Sequence[Organization]
    ) -> _Simulation:
        chaincode = self.chaincodes.get(contents.chaincode)
        if chaincode is None:
            self._endorsement_failed(orgs, f"chaincode {contents.chaincode} not found")
        stub = _Simulation(self.ledger, contents.chaincode, contents, identity.msp_id)
        try:
            stub.response = chaincode.invoke(
                stub, contents.function, contents.args, contents.transient
            )
        except ChaincodeError as exc:
            self._endorsement_failed(
                orgs, f"chaincode response {exc.status}, {exc.message}", grpc.StatusCode.ABORTED
            )
        return stub

    def _endorsement_failed(
        self,
        orgs: Sequence[Organization],
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.ABORTED,
    ) -> NoReturn:
        raise _Abort(
            code,
            "failed to endorse transaction, see attached details for more info",
            [
                gateway_pb2.ErrorDetail(address=o.address, msp_id=o.msp_id, message=message)
                for o in orgs
            ],
        )

    def _select(
        self, requested: Sequence[str], default: Sequence[Organization]
    ) -> list[Organization]:
        unknown = [m for m in requested if m not in self._orgs]
        if unknown:
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no peers available in organizations {unknown} on channel {self.channel!r}",
            )
        return [self._orgs[m] for m in requested] if requested else list(default)

    def _refused(self, orgs: Sequence[Organization]) -> None:
        details = [
            gateway_pb2.ErrorDetail(
                address=o.address, msp_id=o.msp_id, message=self._refusals[o.msp_id]
            )
            for o in orgs
            if o.msp_id in self._refusals
        ]
        if details:
            raise _Abort(
                grpc.StatusCode.ABORTED,
                "failed to endorse transaction, see attached details for more info",
                details,
            )

    def evaluate(self, request: Any) -> Any:
        contents, identity = self._check_proposal(
            request.proposed_transaction, request.transaction_id, request.channel_id
        )
        orgs = self._select(request.target_organizations, self.organizations[:1])[:1]
        self._refused(orgs)
        stub = self._simulate(contents, identity, orgs)
        return gateway_pb2.EvaluateResponse(
            result=proposal_response_pb2.Response(status=200, payload=stub.response)
        )

    def endorse(self, request: Any) -> Any:
        contents, identity = self._check_proposal(
            request.proposed_transaction, request.transaction_id, request.channel_id
        )
        orgs = self._select(request.endorsing_organizations, self.organizations)
        self._refused(orgs)
        stub = self._simulate(contents, identity, orgs)
        payload_without_transient = proposal_pb2.ChaincodeProposalPayload(
            input=contents.payload.input
        ).SerializeToString()
        event = b""
        if stub.event is not None:
            event = chaincode_event_pb2.ChaincodeEvent(
                chaincode_id=contents.chaincode,
                tx_id=contents.tx_id,
                event_name=stub.event[0],
                payload=stub.event[1],
            ).SerializeToString()
        action = proposal_pb2.ChaincodeAction(
            results=stub.read_write_set(),
            events=event,
            response=proposal_response_pb2.Response(status=200, payload=stub.response),
            chaincode_id=chaincode_pb2.ChaincodeID(name=contents.chaincode),
        )
        response_payload = proposal_response_pb2.ProposalResponsePayload(
            # Fabric hashes the headers and the payload without its transient map
            proposal_hash=digest(
                contents.header.channel_header
                + contents.header.signature_header
                + payload_without_transient
            ),
            extension=action.SerializeToString(),
        ).SerializeToString()
        responses = [self._proposal_response(org, response_payload, stub) for org in orgs]
        endorsed = transaction_pb2.ChaincodeEndorsedAction(
            proposal_response_payload=response_payload,
            endorsements=[r.endorsement for r in responses],
        )
        transaction = transaction_pb2.Transaction(
            actions=[
                transaction_pb2.TransactionAction(
                    header=contents.header.signature_header,
                    payload=transaction_pb2.ChaincodeActionPayload(
                        chaincode_proposal_payload=payload_without_transient, action=endorsed
                    ).SerializeToString(),
                )
            ]
        )
        payload = common_pb2.Payload(header=contents.header, data=transaction.SerializeToString())
        return gateway_pb2.EndorseResponse(
            prepared_transaction=common_pb2.Envelope(payload=payload.SerializeToString())
        )

    def _proposal_response(
        self, org: Organization, response_payload: bytes, stub: _Simulation
    ) -> Any:
        endorser = org.identity.serialized()
        return proposal_response_pb2.ProposalResponse(
            version=1,
            response=proposal_response_pb2.Response(status=200, payload=stub.response),
            payload=response_payload,
            endorsement=proposal_response_pb2.Endorsement(
                endorser=endorser, signature=org.signer.sign(digest(response_payload + endorser))
            ),
        )

    # -- ordering and validation ---------------------------------------------------
    def submit(self, request: Any) -> Any:
        self._check_channel(request.channel_id)
        envelope = request.prepared_transaction
        try:
            payload = common_pb2.Payload.FromString(envelope.payload)
            channel_header = common_pb2.ChannelHeader.FromString(payload.header.channel_header)
            signature_header = common_pb2.SignatureHeader.FromString(
                payload.header.signature_header
            )
            submitted = self._read_transaction(channel_header.tx_id, envelope, payload)
        except (DecodeError, IndexError, ValueError) as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed transaction: {exc}") from exc
        if channel_header.tx_id != request.transaction_id:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "transaction id mismatch")
        self._check_signed(envelope.payload, envelope.signature, signature_header.creator)
        tx_id = channel_header.tx_id
        if tx_id in self._pending or self.ledger.find_transaction(tx_id) is not None:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"duplicate transaction id {tx_id}")
        self._pending.add(tx_id)
        self._queue.append(submitted)
        self._queued.set()
        return gateway_pb2.SubmitResponse()

    @staticmethod
    def _read_transaction(tx_id: str, envelope: Any, payload: Any) -> _Submitted:
        transaction = transaction_pb2.Transaction.FromString(payload.data)
        action_payload = transaction_pb2.ChaincodeActionPayload.FromString(
            transaction.actions[0].payload
        )
        response_payload = proposal_response_pb2.ProposalResponsePayload.FromString(
            action_payload.action.proposal_response_payload
        )
        action = proposal_pb2.ChaincodeAction.FromString(response_payload.extension)
        rwset = rwset_pb2.TxReadWriteSet.FromString(action.results)
        rwsets = tuple(
            (ns.namespace, kv_rwset_pb2.KVRWSet.FromString(ns.rwset)) for ns in rwset.ns_rwset
        )
        event = (
            chaincode_event_pb2.ChaincodeEvent.FromString(action.events) if action.events else None
        )
        return _Submitted(tx_id, envelope.SerializeToString(), rwsets, event)

    async def _order_loop(self) -> None:
        """Cuts a block from everything queued (after ``commit_delay``), validates and
        commits it, and wakes commit-status and event waiters. The queue is only
        emptied once the block is cut, so a stop() during the delay loses nothing."""
        while True:
            await self._queued.wait()
            if self.commit_delay:
                await asyncio.sleep(self.commit_delay)
            batch, self._queue = self._queue, []
            self._queued.clear()
            if batch:
                self._commit_block(batch)
            async with self._committed:
                self._committed.notify_all()

    def _commit_block(self, batch: Sequence[_Submitted]) -> None:
        written: set[tuple[str, str]] = set()
        entries = []
        for tx in batch:
            code = self._validate(tx, written)
            writes = [
                Write(ns, w.key, None if w.is_delete else bytes(w.value))
                for ns, kv in tx.rwsets
                for w in kv.writes
            ]
            if code == transaction_pb2.VALID:
                written.update((w.namespace, w.key) for w in writes)
            event = tx.event if code == transaction_pb2.VALID else None
            entries.append((CommittedTransaction(tx.tx_id, code, tx.envelope, event), writes))
            self._pending.discard(tx.tx_id)
        self.ledger.append_block(entries)

    def _validate(self, tx: _Submitted, written: set[tuple[str, str]]) -> int:
        if self._forced_conflicts > 0:
            self._forced_conflicts -= 1
            return int(transaction_pb2.MVCC_READ_CONFLICT)
        for ns, kv in tx.rwsets:
            for read in kv.reads:
                current = self.ledger.get_state(ns, read.key)
                now = current[1] if current else None
                then = (
                    Version(read.version.block_num, read.version.tx_num)
                    if read.HasField("version")
                    else None
                )
                if (ns, read.key) in written or now != then:
                    return int(transaction_pb2.MVCC_READ_CONFLICT)
            for query in kv.range_queries_info:
                rows = self.ledger.get_state_range(ns, query.start_key, query.end_key)
                seen = [
                    (r.key, Version(r.version.block_num, r.version.tx_num))
                    for r in query.raw_reads.kv_reads
                ]
                if [(k, v) for k, _, v in rows] != seen or any(
                    n == ns and query.start_key <= k and (not query.end_key or k < query.end_key)
                    for n, k in written
                ):
                    return int(transaction_pb2.PHANTOM_READ_CONFLICT)
        return int(transaction_pb2.VALID)

    def _has_block(self, number: int) -> bool:
        return self.ledger.height() > number

    async def commit_status(self, signed: Any) -> Any:
        request = gateway_pb2.CommitStatusRequest.FromString(signed.request)
        self._check_channel(request.channel_id)
        self._check_signed(signed.request, signed.signature, request.identity)
        async with self._committed:
            await self._committed.wait_for(
                lambda: self.ledger.find_transaction(request.transaction_id) is not None
            )
        found = self.ledger.find_transaction(request.transaction_id)
        assert found is not None
        return gateway_pb2.CommitStatusResponse(
            result=found[1].validation_code, block_number=found[0]
        )

    async def chaincode_events(self, signed: Any) -> AsyncIterator[Any]:
        request = gateway_pb2.ChaincodeEventsRequest.FromString(signed.request)
        self._check_channel(request.channel_id)
        self._check_signed(signed.request, signed.signature, request.identity)
        position = request.start_position
        kind = position.WhichOneof("Type")
        if kind == "specified":
            number = int(position.specified.number)
        elif kind == "oldest":
            number = 0
        elif kind == "newest":
            number = self.ledger.height() - 1
        else:  # next_commit, or unset
            number = self.ledger.height()
        skip_until = request.after_transaction_id
        first = True
        while True:
            async with self._committed:
                await self._committed.wait_for(functools.partial(self._has_block, number))
            block = self.ledger.block(number)
            assert block is not None
            events = [
                tx.event
                for tx in block.transactions
                if tx.event is not None and tx.event.chaincode_id == request.chaincode_id
            ]
            if first and skip_until:
                ids = [e.tx_id for e in events]
                if skip_until in ids:
                    events = events[ids.index(skip_until) + 1 :]
            first = False
            if events:
                yield gateway_pb2.ChaincodeEventsResponse(events=events, block_number=number)
            number += 1


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: _Abort) -> NoReturn:
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=errors.encode_error_details(error.code, error.message, error.details)
        if error.details
        else (),
    )
    raise AssertionError("context.abort returns only by raising")


class _Servicer(gateway_pb2_grpc.GatewayServicer):  # type: ignore[misc]
    """gRPC glue: the official servicer's methods, mapping refusals to statuses."""

    def __init__(self, peer: TestPeer) -> None:
        self._peer = peer

    async def Evaluate(self, request: Any, context: Any) -> Any:
        if self._peer.endorse_delay:
            await asyncio.sleep(self._peer.endorse_delay)
        try:
            return self._peer.evaluate(request)
        except _Abort as exc:
            await _abort(context, exc)

    async def Endorse(self, request: Any, context: Any) -> Any:
        if self._peer.endorse_delay:
            await asyncio.sleep(self._peer.endorse_delay)
        try:
            return self._peer.endorse(request)
        except _Abort as exc:
            await _abort(context, exc)

    async def Submit(self, request: Any, context: Any) -> Any:
        try:
            return self._peer.submit(request)
        except _Abort as exc:
            await _abort(context, exc)

    async def CommitStatus(self, request: Any, context: Any) -> Any:
        try:
            return await self._peer.commit_status(request)
        except _Abort as exc:
            await _abort(context, exc)

    async def ChaincodeEvents(self, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for response in self._peer.chaincode_events(request):
                yield response
        except _Abort as exc:
            await _abort(context, exc)

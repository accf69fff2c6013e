"""A tiny key-value chaincode for the tests: put/get/list/transfer over the stub."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from ledgerlens.fabric.chaincode import ChaincodeError, ChaincodeStub


class KeyValueChaincode:
    name = "kv"

    def invoke(
        self,
        stub: ChaincodeStub,
        function: str,
        args: Sequence[bytes],
        transient: Mapping[str, bytes],
    ) -> bytes:
        if function == "put":
            key, value = args[0].decode(), args[1]
            stub.put_state(key, value)
            stub.set_event("put", key.encode())
            return value
        if function == "put_secret":
            # the secret comes in the transient map and only its hash is written, so it
            # never reaches the transaction or the ledger
            key = args[0].decode()
            stub.put_state(key, hashlib.sha256(transient["value"]).hexdigest().encode())
            return b"ok"
        if function == "get":
            found = stub.get_state(args[0].decode())
            if found is None:
                raise ChaincodeError(f"key {args[0].decode()} not found", 404)
            return found
        if function == "increment":
            # read-modify-write: the shape that hits MVCC conflicts under contention
            key = args[0].decode()
            current = int(stub.get_state(key) or b"0")
            stub.put_state(key, str(current + 1).encode())
            return str(current + 1).encode()
        if function == "list":
            rows = stub.get_state_by_range(args[0].decode(), args[1].decode())
            return b",".join(k.encode() for k, _ in rows)
        if function == "whoami":
            return f"{stub.get_creator_msp_id()}:{stub.get_tx_id()}".encode()
        raise ChaincodeError(f"unknown function {function}", 400)

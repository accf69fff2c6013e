"""Chaincode events with checkpoints, resumed across peer restarts.

The Gateway streams one ``ChaincodeEventsResponse`` per block holding the chaincode's
events. A :class:`Checkpoint` (block number, tx id of the last event handled) is enough
to resume exactly: the Gateway's ``after_transaction_id`` skips what was already seen
in that block. The official clients leave reconnection to the caller; this stream does
it itself, from its own checkpoint, which is what makes "no event lost or repeated"
hold across a peer restart.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from ledgerlens.fabric import errors

__all__ = ["ChaincodeEvent", "ChaincodeEventStream", "Checkpoint", "ReconnectPolicy"]


@dataclass(frozen=True)
class Checkpoint:
    """Where to resume: block ``block_number``, after the transaction ``tx_id`` (all of
    that block when ``tx_id`` is empty). Persist it to resume after a process restart."""

    block_number: int
    tx_id: str = ""


@dataclass(frozen=True)
class ChaincodeEvent:
    block_number: int
    tx_id: str
    chaincode: str
    name: str
    payload: bytes

    @property
    def checkpoint(self) -> Checkpoint:
        """The position just after this event."""
        return Checkpoint(self.block_number, self.tx_id)


@dataclass(frozen=True)
class ReconnectPolicy:
    """How hard the event stream tries to reconnect after the peer goes away: at most
    ``max_attempts`` consecutive failed connections, exponential backoff between them.
    The count restarts once a connection delivers a block."""

    max_attempts: int = 10
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    codes: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    )


def backoff_retrying(
    max_attempts: int,
    initial_backoff: float,
    max_backoff: float,
    retry_if: Callable[[BaseException], bool],
) -> AsyncRetrying:
    """At most ``max_attempts`` tries of what ``retry_if`` accepts, exponential backoff
    with jitter between them: the shape of both the submit retry and the reconnect."""
    return AsyncRetrying(
        stop=stop_after_attempt(max(1, max_attempts)),
        wait=wait_exponential_jitter(
            multiplier=initial_backoff, max=max_backoff, jitter=initial_backoff
        ),
        retry=retry_if_exception(retry_if),
        reraise=True,
    )


# returns a grpc.aio UnaryStreamCall (read() / cancel())
OpenStream = Callable[[Checkpoint | None], Any]


class ChaincodeEventStream:
    """Async iterator of :class:`ChaincodeEvent`; ``checkpoint`` is where it would
    resume now. Close it (``async with`` or ``aclose()``) to cancel the gRPC stream."""

    def __init__(
        self, open_stream: OpenStream, start: Checkpoint | None, policy: ReconnectPolicy
    ) -> None:
        self._open = open_stream
        self.checkpoint = start
        self._policy = policy
        self._events = self._run()

    def __aiter__(self) -> ChaincodeEventStream:
        return self

    async def __anext__(self) -> ChaincodeEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> ChaincodeEventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _reconnectable(self, exc: BaseException) -> bool:
        return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in self._policy.codes

    async def _connect(self) -> tuple[Any, Any]:
        """Opens the stream and reads its first block, retrying connection failures."""
        policy = self._policy
        retrying = backoff_retrying(
            policy.max_attempts, policy.initial_backoff, policy.max_backoff, self._reconnectable
        )
        try:
            async for attempt in retrying:
                with attempt:
                    call = self._open(self.checkpoint)
                    try:
                        return call, await call.read()
                    except BaseException:
                        call.cancel()
                        raise
        except grpc.aio.AioRpcError as exc:
            raise errors.ChaincodeEventsError.from_rpc_error(exc) from exc
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _run(self) -> AsyncGenerator[ChaincodeEvent, None]:
        while True:
            call, response = await self._connect()
            try:
                while response is not EOF:
                    block = int(response.block_number)
                    for event in response.events:
                        # advanced before the yield: a consumer that stops mid-block
                        # resumes after the last event it received
                        self.checkpoint = Checkpoint(block, event.tx_id)
                        yield ChaincodeEvent(
                            block_number=block,
                            tx_id=event.tx_id,
                            chaincode=event.chaincode_id,
                            name=event.event_name,
                            payload=bytes(event.payload),
                        )
                    self.checkpoint = Checkpoint(block + 1)
                    response = await call.read()
                return  # the peer ended the stream
            except grpc.aio.AioRpcError as exc:
                if not self._reconnectable(exc):
                    raise errors.ChaincodeEventsError.from_rpc_error(exc) from exc
                # otherwise loop: reconnect from self.checkpoint
            finally:
                call.cancel()

"""The RPC being served, as one context variable.

Auth (the caller), logs (the method) and the interceptor (the call's metadata and
state) read the same per-call object, set once when grpc.aio looks up the call's
handler: inside a running server each ``ContextVar.set`` cost about 2 µs and building
the metadata again with ``context.invocation_metadata()`` about 9 µs
(``bench/runtime_overhead.py``), so a call sets one variable and reuses the metadata
grpc already built for the lookup. The variable lives in the call's own task context,
so nothing leaks from one call to the next.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledgerlens.runtime.auth import Principal

__all__ = ["CallInfo", "call_var", "current_call"]


class CallInfo:
    """What is known of the call being served."""

    __slots__ = ("metadata", "method", "principal")

    def __init__(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
        #: ``/pkg.Service/Method``
        self.method = method
        #: the invocation metadata as grpc built it (None: ask the servicer context)
        self.metadata = metadata
        #: the verified caller, once authenticated (None for public RPCs or no auth)
        self.principal: Principal | None = None


#: the call being served in this task (None outside a served call).
call_var: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "ledgerlens_call", default=None
)


def current_call() -> CallInfo | None:
    return call_var.get()

"""gRPC helpers the identity tests share (imported by name: tests are not a package)."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


async def rpc_code(call: Any) -> grpc.StatusCode:
    """The status code ``call`` fails with (the test fails when it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()

"""Revoked API keys: the gateway refuses tokens whose key was revoked.

The runtime verifies JWTs locally, so a token of a revoked key stays cryptographically
valid until it expires. Decision: the gateway refuses it anyway (UNAUTHENTICATED, reason
``API_KEY_REVOKED``) as soon as this replica knows of the revocation: the
``identity.key.revoked`` consumer calls :meth:`Revocations.revoke`, which stores the key
id (``inference_revoked_keys``) and adds it to an in-memory set that every RPC checks
(one set lookup, no I/O). The set is loaded from the store at start, so a restart keeps
it, and reloaded every ``refresh_seconds``, so replicas that share the database but not
the event (one durable consumer delivers each event to one replica) converge within
that interval.

Whatever was produced for a key stays with that key: idempotency results are scoped by
(tenant, key, rpc) and the response cache by (tenant, key), so a new key never gets the
revoked key's replays or cached answers. Its limits counters simply expire.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from ledgerlens.runtime.errors import Unauthenticated
from ledgerlens.services.inference.store import UsageStore

__all__ = ["Revocations"]

_log = logging.getLogger(__name__)


class Revocations:
    """The revoked key ids this replica refuses (see the module docstring)."""

    def __init__(self, store: UsageStore | None = None, *, refresh_seconds: float = 30.0):
        self._store = store
        self._refresh_seconds = refresh_seconds
        self._revoked: set[str] = set()

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._revoked

    def check(self, key_id: str) -> None:
        """Raise :class:`Unauthenticated` when ``key_id`` was revoked."""
        if key_id in self._revoked:
            raise Unauthenticated(
                "the API key of this token was revoked; use another key",
                reason="API_KEY_REVOKED",
            )

    async def load(self) -> None:
        """Add every revoked key id the store knows (revocations are never undone)."""
        if self._store is not None:
            self._revoked |= await self._store.revoked_key_ids()

    async def revoke(self, key_id: str, tenant_id: str, revoked_at: datetime) -> None:
        """Refuse ``key_id`` from now on, here and (through the store) after a restart."""
        if self._store is not None:
            await self._store.add_revoked_key(key_id, tenant_id, revoked_at)
        self._revoked.add(key_id)

    async def refresh_forever(self) -> None:
        """Reload from the store every ``refresh_seconds`` (run it as a task)."""
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.load()
            except Exception:  # noqa: BLE001 - keep refusing what we know; retry next round
                _log.warning("could not reload the revoked API keys", exc_info=True)

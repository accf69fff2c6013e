"""A service's own token from identity, by the OAuth2 client-credentials grant.

:class:`ClientCredentialsTokens` is an async token provider (see
:data:`ledgerlens.runtime.clients.TokenProvider`): it posts
``grant_type=client_credentials`` with HTTP Basic client authentication to identity's
``/oauth/token``, caches the token until shortly before its ``expires_in`` and fetches
a new one under a lock, so concurrent callers share one request. A failure raises
:class:`~ledgerlens.runtime.errors.Unavailable` naming the token URL (never the secret).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from ledgerlens.runtime.errors import Unavailable

__all__ = ["ClientCredentialsTokens"]


class ClientCredentialsTokens:
    """``await tokens()`` is a valid bearer token of ``client_id``."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        refresh_margin_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.refresh_margin_seconds = refresh_margin_seconds
        self.timeout_seconds = timeout_seconds
        self._clock = clock
        self._transport = transport
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        #: how many tokens were fetched (for tests and metrics).
        self.fetches = 0

    def __repr__(self) -> str:
        return f"ClientCredentialsTokens({self.token_url!r}, client_id={self.client_id!r})"

    def _cached(self) -> str | None:
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        return None

    async def __call__(self) -> str:
        token = self._cached()
        if token is not None:
            return token
        async with self._lock:
            token = self._cached()  # another caller may have fetched it meanwhile
            if token is not None:
                return token
            started = self._clock()
            token, expires_in = await self._fetch()
            # refresh before it expires: the margin, but never more than half its life
            margin = min(self.refresh_margin_seconds, expires_in / 2)
            self._token = token
            self._refresh_at = started + expires_in - margin
            return token

    def _unavailable(self, why: str) -> Unavailable:
        return Unavailable(
            f"could not get a service token from {self.token_url} "
            f"(client_id {self.client_id}): {why}",
            reason="SERVICE_TOKEN_UNAVAILABLE",
            metadata={"token_url": self.token_url},
        )

    async def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout_seconds, transport=self._transport
            ) as http:
                response = await http.post(
                    self.token_url,
                    data=form,
                    auth=httpx.BasicAuth(self.client_id, self._secret),
                    headers={"Accept": "application/json"},
                )
        except httpx.HTTPError as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}") from None
        self.fetches += 1
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            detail = ""
            if isinstance(body, dict):
                detail = f": {body.get('error', '')} {body.get('error_description', '')}".rstrip()
            raise self._unavailable(f"HTTP {response.status_code}{detail}")
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise self._unavailable("the answer holds no access_token")
        expires_in = body.get("expires_in", 60)
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            raise self._unavailable(f"bad expires_in {expires_in!r}")
        return body["access_token"], float(expires_in)

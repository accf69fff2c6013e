"""A service's own token from the real identity service (client credentials), and the
dev stack's provisioning of that key with identity's own ``create-key``."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import SecretStr

from ledgerlens.runtime.clients import service_token_provider
from ledgerlens.runtime.devstack import provision_service_credentials
from ledgerlens.runtime.errors import Unavailable
from ledgerlens.runtime.service_tokens import ClientCredentialsTokens
from ledgerlens.runtime.settings import ServiceSettings
from ledgerlens.services.identity.app import RunningIdentity, run_identity
from ledgerlens.services.identity.settings import Settings as IdentitySettings
from ledgerlens.services.identity.tokens import TokenState

pytestmark = [pytest.mark.integration]


@dataclass
class Identity:
    running: RunningIdentity
    database_url: str
    data_dir: Path

    @property
    def token_url(self) -> str:
        return f"{self.running.http_url}/oauth/token"


@pytest_asyncio.fixture
async def identity(sqlite_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[Identity]:
    data_dir = tmp_path / "identity"
    settings = IdentitySettings(
        database_url=sqlite_url,
        nats_url=nats_url,
        grpc_port=0,
        http_port=0,
        data_dir=str(data_dir),
        shutdown_grace_seconds=1,
    )
    async with run_identity(settings) as running:
        yield Identity(running, sqlite_url, data_dir)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_token_fetched_cached_and_refreshed(identity: Identity) -> None:
    record, secret = await identity.running.core.create_key("acme", "svc", ["search:read"])
    clock = Clock()
    tokens = ClientCredentialsTokens(identity.token_url, record.key_id, secret, clock=clock)

    first = await asyncio.gather(*(tokens() for _ in range(10)))
    assert tokens.fetches == 1
    assert len(set(first)) == 1
    seen = await identity.running.core.introspect(first[0])
    assert seen.state is TokenState.ACTIVE
    assert seen.tenant_id == "acme"
    assert "search:read" in seen.scopes

    clock.now += 60  # well within the 900 s lifetime: cached
    assert await tokens() == first[0]
    assert tokens.fetches == 1

    clock.now += 900  # past expires_in minus the margin: fetched anew
    again = await asyncio.gather(*(tokens() for _ in range(5)))
    assert tokens.fetches == 2
    assert len(set(again)) == 1
    assert again[0] != first[0]


async def test_bad_secret_is_unavailable_and_names_the_url(identity: Identity) -> None:
    record, secret = await identity.running.core.create_key("acme", "svc", ["search:read"])
    tokens = ClientCredentialsTokens(identity.token_url, record.key_id, "wrong-" + secret)
    with pytest.raises(Unavailable) as caught:
        await tokens()
    assert identity.token_url in caught.value.message
    assert "401" in caught.value.message
    assert secret not in caught.value.message


async def test_unreachable_identity_is_unavailable() -> None:
    tokens = ClientCredentialsTokens("http://127.0.0.1:9/oauth/token", "llk_x", "s3cret")
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1:9/oauth/token"):
        await tokens()


async def test_service_token_provider_prefers_static_token(identity: Identity) -> None:
    record, secret = await identity.running.core.create_key("acme", "svc", ["search:read"])
    creds = ServiceSettings(
        service_client_id=record.key_id,
        service_client_secret=SecretStr(secret),
        service_token_url=identity.token_url,
    )
    static = service_token_provider(creds.model_copy(update={"service_token": SecretStr("t0k")}))
    assert static() == "t0k"
    provider = service_token_provider(creds)
    assert isinstance(provider, ClientCredentialsTokens)
    assert await provider()
    assert service_token_provider(ServiceSettings())() is None
    with pytest.raises(ValueError, match="service_token_url"):
        service_token_provider(ServiceSettings(service_client_id="llk_x"))


async def test_devstack_provisions_credentials_once(identity: Identity, tmp_path: Path) -> None:
    identity_env = {
        "LEDGERLENS_IDENTITY_DATABASE_URL": identity.database_url,
        "LEDGERLENS_IDENTITY_DATA_DIR": str(identity.data_dir),
    }
    data_dir = tmp_path / "stack"
    first = await provision_service_credentials(
        "inference",
        ["search:read"],
        data_dir=data_dir,
        identity_env=identity_env,
        token_url=identity.token_url,
    )
    path = data_dir / "devstack" / "inference-service-credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first["client_secret"] in path.read_text()

    tokens = ClientCredentialsTokens(identity.token_url, first["client_id"], first["client_secret"])
    seen = await identity.running.core.introspect(await tokens())
    assert seen.state is TokenState.ACTIVE
    assert seen.tenant_id == "devstack"
    assert set(seen.scopes) == {"search:read"}

    second = await provision_service_credentials(
        "inference",
        ["search:read"],
        data_dir=data_dir,
        identity_env=identity_env,
        token_url=identity.token_url,
    )
    assert second == first
    page = await identity.running.core.list_keys("devstack")
    assert [key.name for key in page.keys] == ["inference-service"]

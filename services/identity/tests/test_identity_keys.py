"""API keys: validation, hashing at rest, listing, revocation (+ outbox), authentication."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledgerlens.events.v1 import events_pb2
from ledgerlens.options.v1 import auth_pb2
from ledgerlens.runtime.errors import InvalidArgument, NotFound, Unauthenticated
from ledgerlens.runtime.events import Subjects
from ledgerlens.services.identity.keys import KNOWN_SCOPES, ApiKeyState
from ledgerlens.services.identity.schema import OUTBOX, Base
from ledgerlens.services.identity.service import IdentityCore

REPO = Path(__file__).resolve().parents[3]


def _documented_scopes() -> list[str]:
    text_ = (REPO / "protos/ledgerlens/options/v1/auth.proto").read_text()
    block = text_.split("The scopes (the complete v1 list", 1)[1].split("message AuthPolicy", 1)[0]
    return re.findall(r"^//\s{3}([a-z]+(?::[a-z]+)?)\s{2,}", block, flags=re.MULTILINE)


def _contract_scopes() -> set[str]:
    """Every scope some RPC of some generated contract requires."""
    used: set[str] = set()
    for svc in ("identity", "ingestion", "retrieval", "inference", "ledger"):
        name = f"ledgerlens.{svc}.v1.{svc}_pb2"
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                policy = method.GetOptions().Extensions[auth_pb2.auth]
                used.update(policy.scopes)
    return used


def test_known_scopes_equal_the_contract_list() -> None:
    documented = _documented_scopes()
    assert len(documented) == 11
    assert set(documented) == set(KNOWN_SCOPES)
    used = _contract_scopes()
    assert "keys:admin" in used  # the walk really found the identity contract
    assert used <= set(KNOWN_SCOPES)


async def test_create_key_returns_secret_and_public_record(core: IdentityCore) -> None:
    record, secret = await core.create_key("acme", "ci", ["search:read", "ingest:write"])
    assert re.fullmatch(r"llk_[0-9a-f]{16}", record.key_id)
    assert secret.startswith("lls_")
    assert len(base64.urlsafe_b64decode(secret[4:] + "=")) == 32
    assert record.tenant_id == "acme"
    assert record.scopes == ("search:read", "ingest:write")
    assert core.key_state(record) is ApiKeyState.ACTIVE
    other, other_secret = await core.create_key("acme", "ci", ["search:read"])
    assert other.key_id != record.key_id
    assert other_secret != secret


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["search:read", "root"]}, "scopes"),
        ({"scopes": [f"s{i}" for i in range(21)]}, "scopes"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"expires_in": -1}, "expires_at"),
    ],
)
async def test_create_key_validation(
    core: IdentityCore, clock: Any, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"tenant_id": "acme", "name": "ok", "scopes": ["search:read"]}
    kwargs = dict(kwargs)  # parametrize shares the dict between both backends
    expires_in = kwargs.pop("expires_in", None)
    args.update(kwargs)
    if expires_in is not None:
        args["expires_at"] = clock() + timedelta(seconds=expires_in)
    with pytest.raises(InvalidArgument) as err:
        await core.create_key(**args)
    assert field in {f for f, _ in err.value.violations}


async def test_name_of_100_chars_and_20_scopes_are_accepted(core: IdentityCore) -> None:
    record, _ = await core.create_key("acme", "n" * 100, list(KNOWN_SCOPES))
    assert len(record.name) == 100
    assert record.scopes == KNOWN_SCOPES


async def _dump_all_tables(engine: AsyncEngine) -> list[Any]:
    values: list[Any] = []
    async with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = (await conn.execute(text(f"SELECT * FROM {table.name}"))).all()  # noqa: S608
            for row in rows:
                values.extend(row)
    return values


def _forms_of(secret: str) -> list[bytes]:
    raw = base64.urlsafe_b64decode(secret[4:] + "=")
    return [
        secret.encode(),
        secret[4:].encode(),
        raw,
        raw.hex().encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw),
        base64.b64encode(secret.encode()),
    ]


async def test_secret_is_never_stored_in_clear(core: IdentityCore, engine: AsyncEngine) -> None:
    secrets_ = [(await core.create_key("acme", f"k{i}", ["search:read"]))[1] for i in range(3)]
    values = await _dump_all_tables(engine)
    assert values, "the dump found nothing: the test would prove nothing"
    blob = b"\x00".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
    for secret in secrets_:
        for form in _forms_of(secret):
            assert form not in blob
    # and the signing key's private half is only stored encrypted
    private_key = core.signing._active.private_key  # type: ignore[union-attr]
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert der not in blob


async def test_list_keys_pages_newest_first(core: IdentityCore, clock: Any) -> None:
    created = []
    for i in range(5):
        created.append((await core.create_key("acme", f"k{i}", ["search:read"]))[0])
        clock.advance(1)
    await core.create_key("other", "theirs", ["search:read"])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await core.list_keys("acme", page_size=2, page_token=token)
        pages += 1
        seen.extend(k.key_id for k in page.keys)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [k.key_id for k in reversed(created)]


async def test_list_keys_same_created_at_pages_by_key_id(core: IdentityCore) -> None:
    ids = {(await core.create_key("acme", f"k{i}", ["search:read"]))[0].key_id for i in range(4)}
    first = await core.list_keys("acme", page_size=3)
    second = await core.list_keys("acme", page_size=3, page_token=first.next_page_token)
    got = [k.key_id for k in first.keys + second.keys]
    assert got == sorted(ids, reverse=True)
    assert second.next_page_token == ""


async def test_list_keys_filters_inactive(core: IdentityCore, clock: Any) -> None:
    live, _ = await core.create_key("acme", "live", ["search:read"])
    revoked, _ = await core.create_key("acme", "revoked", ["search:read"])
    expiring, _ = await core.create_key(
        "acme", "expiring", ["search:read"], clock() + timedelta(seconds=10)
    )
    await core.revoke_key(revoked.key_id, "test")
    clock.advance(11)
    active = await core.list_keys("acme")
    assert [k.key_id for k in active.keys] == [live.key_id]
    everything = await core.list_keys("acme", include_inactive=True)
    states = {k.key_id: core.key_state(k) for k in everything.keys}
    assert states == {
        live.key_id: ApiKeyState.ACTIVE,
        revoked.key_id: ApiKeyState.REVOKED,
        expiring.key_id: ApiKeyState.EXPIRED,
    }


async def test_page_token_of_another_query_is_invalid(core: IdentityCore) -> None:
    for i in range(3):
        await core.create_key("acme", f"k{i}", ["search:read"])
    page = await core.list_keys("acme", page_size=1)
    assert page.next_page_token
    with pytest.raises(InvalidArgument) as err:
        await core.list_keys("acme", include_inactive=True, page_token=page.next_page_token)
    assert err.value.violations[0][0] == "page_token"
    with pytest.raises(InvalidArgument):
        await core.list_keys("other", page_token=page.next_page_token)
    with pytest.raises(InvalidArgument):
        await core.list_keys("acme", page_token="not-a-token!")
    with pytest.raises(InvalidArgument) as size_err:
        await core.list_keys("acme", page_size=501)
    assert size_err.value.violations[0][0] == "page_size"


async def _outbox_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(OUTBOX))).all())


async def test_revoke_writes_one_outbox_event_and_is_idempotent(
    core: IdentityCore, engine: AsyncEngine
) -> None:
    record, _ = await core.create_key("acme", "k", ["search:read"])
    revoked = await core.revoke_key(record.key_id, "leaked in a log")
    assert revoked.revoked_at is not None
    assert core.key_state(revoked) is ApiKeyState.REVOKED
    again = await core.revoke_key(record.key_id, "second time")
    assert again.revoked_at == revoked.revoked_at
    assert again.revoke_reason == "leaked in a log"
    rows = await _outbox_rows(engine)
    assert len(rows) == 1
    row = rows[0]
    assert row.subject == Subjects.IDENTITY_KEY_REVOKED
    assert row.msg_id == f"key-revoked:{record.key_id}"
    event = events_pb2.ApiKeyRevoked.FromString(row.payload)
    assert event.key_id == record.key_id
    assert event.tenant_id == "acme"
    assert event.reason == "leaked in a log"
    assert event.revoked_at.ToDatetime().replace(tzinfo=revoked.revoked_at.tzinfo) == (
        revoked.revoked_at
    )


async def test_revoke_unknown_key_is_not_found(core: IdentityCore, engine: AsyncEngine) -> None:
    with pytest.raises(NotFound):
        await core.revoke_key("llk_0000000000000000", "x")
    with pytest.raises(InvalidArgument):
        await core.revoke_key("llk_0000000000000000", "x" * 257)
    assert await _outbox_rows(engine) == []


async def test_authenticate(core: IdentityCore, clock: Any) -> None:
    record, secret = await core.create_key("acme", "k", ["search:read"])
    assert record.last_used_at is None
    ok = await core.keys.authenticate(record.key_id, secret)
    assert ok.key_id == record.key_id
    stored = await core.store.get_api_key(record.key_id)
    assert stored is not None
    first_use = clock()
    assert stored[0].last_used_at == first_use
    # kept to the minute: a use within it writes nothing, a later one does
    clock.advance(30)
    await core.keys.authenticate(record.key_id, secret)
    stored = await core.store.get_api_key(record.key_id)
    assert stored is not None
    assert stored[0].last_used_at == first_use
    clock.advance(31)
    await core.keys.authenticate(record.key_id, secret)
    stored = await core.store.get_api_key(record.key_id)
    assert stored is not None
    assert stored[0].last_used_at == clock()

    with pytest.raises(Unauthenticated) as wrong:
        await core.keys.authenticate(record.key_id, secret + "x")
    with pytest.raises(Unauthenticated) as unknown:
        await core.keys.authenticate("llk_0123456789abcdef", secret)
    with pytest.raises(Unauthenticated) as garbage:
        await core.keys.authenticate("not-a-key", secret)
    # one message and reason: no oracle telling which key ids exist
    assert wrong.value.message == unknown.value.message == garbage.value.message
    assert wrong.value.reason == unknown.value.reason


async def test_authenticate_revoked_and_expired(core: IdentityCore, clock: Any) -> None:
    revoked, revoked_secret = await core.create_key("acme", "r", ["search:read"])
    await core.revoke_key(revoked.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await core.keys.authenticate(revoked.key_id, revoked_secret)
    expiring, expiring_secret = await core.create_key(
        "acme", "e", ["search:read"], clock() + timedelta(minutes=5)
    )
    await core.keys.authenticate(expiring.key_id, expiring_secret)
    clock.advance(301)
    with pytest.raises(Unauthenticated, match="expired"):
        await core.keys.authenticate(expiring.key_id, expiring_secret)

"""The shared test fixtures of ledgerlens.runtime.testing give real, isolated servers."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest
import redis
from google.protobuf import wrappers_pb2
from sqlalchemy import text

from ledgerlens.runtime import testing
from ledgerlens.runtime.db import create_engine
from ledgerlens.runtime.events import STREAMS, ConsumerSpec, EventBus, dead_letter_subject
from ledgerlens.runtime.testing import (
    EventNames,
    PgDatabase,
    PrivateNatsServer,
    RedisDatabase,
    delete_streams,
    free_port,
)

pytestmark = pytest.mark.integration


def test_event_names_isolate_subjects_and_streams() -> None:
    names = EventNames("ab12cd34")
    assert (
        names.subject("ledgerlens.ledger.anchor.committed.v1")
        == "tab12cd34.ledger.anchor.committed.v1"
    )
    stream = names.stream(STREAMS["LEDGER"])
    assert stream.name == "LEDGER_AB12CD34"
    assert stream.subjects == ("tab12cd34.ledger.>",)
    consumer = names.consumer(
        ConsumerSpec(stream="LEDGER", durable="x", filter_subject="ledgerlens.ledger.a.v1")
    )
    assert (consumer.stream, consumer.durable, consumer.filter_subject) == (
        "LEDGER_AB12CD34",
        "x-ab12cd34",
        "tab12cd34.ledger.a.v1",
    )
    dlq = names.platform_streams()["DEADLETTER"]
    assert dead_letter_subject(consumer.filter_subject).startswith(dlq.subjects[0][:-1])


async def test_streams_of_a_test_are_deleted_and_no_others(
    nats_url: str, event_bus: EventBus
) -> None:
    mine, other = EventNames("00000001"), EventNames("00000002")
    try:
        for names in (mine, other):
            await event_bus.ensure_stream(names.stream(STREAMS["LEDGER"]))
        assert await delete_streams(nats_url, mine) == ["LEDGER_00000001"]
        remaining = {info.config.name for info in await event_bus.manager.streams_info()}
        assert "LEDGER_00000001" not in remaining
        assert "LEDGER_00000002" in remaining
    finally:
        await delete_streams(nats_url, other)


async def test_pg_database_is_a_schema_of_its_own(
    pg_database: PgDatabase, pg_schema_url: str
) -> None:
    assert pg_schema_url == pg_database.url
    assert f"search_path={pg_database.schema}" in pg_schema_url
    engine = create_engine(pg_schema_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE isolated (id int)"))
            schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
            where = (
                (
                    await conn.execute(
                        text(
                            "SELECT table_schema FROM information_schema.tables "
                            "WHERE table_name = 'isolated'"
                        )
                    )
                )
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()
    assert schema == pg_database.schema
    assert where == [pg_database.schema]


def test_redis_db_is_a_database_of_its_own(redis_db: RedisDatabase, redis_url: str) -> None:
    assert redis_db.db != 0
    mine = redis.Redis.from_url(redis_db.url)
    base = redis.Redis.from_url(redis_url)
    try:
        assert mine.dbsize() == 0  # flushed for us
        mine.set(f"{redis_db.key_prefix}k", "v")
        assert base.get(f"{redis_db.key_prefix}k") is None
        assert base.get(f"ledgerlens:test:db-claim:{redis_db.db}") is not None
    finally:
        mine.close()
        base.close()


async def test_sqlite_url_is_a_wal_file_under_tmp_path(sqlite_url: str, tmp_path: Path) -> None:
    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
    finally:
        await engine.dispose()
    assert (tmp_path / "test.db").exists()
    assert mode == "wal"


async def test_private_nats_server_keeps_streams_across_restart(tmp_path: Path) -> None:
    server = PrivateNatsServer(store_dir=tmp_path / "store")
    with server:
        assert server.running
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.one", wrappers_pb2.StringValue(value="x").SerializeToString())
        await nc.close()

        port = server.port
        server.restart()
        assert server.port == port

        nc = await nats.connect(server.url)
        info = await nc.jsm().stream_info("KEEP")
        await nc.close()
        assert info.state.messages == 1

        server.kill()
        assert not server.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert server.store_dir.exists()  # a store we passed in is ours to keep


async def test_probe_reports_an_unreachable_nats() -> None:
    problem = await testing._probe_nats(f"nats://127.0.0.1:{free_port()}")
    assert problem is not None


def test_missing_server_fails_on_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        testing._unavailable("Redis", "refused")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="Redis is not reachable: refused"):
        testing._unavailable("Redis", "refused")


def test_create_engine_rejects_a_bad_search_path() -> None:
    with pytest.raises(ValueError, match="invalid schema"):
        create_engine("postgresql+asyncpg://u@h/db?search_path=x;drop")

"""Fixtures of the inference service tests: the service started in-process over real
gRPC (free ports), real NATS in a namespace of its own, SQLite, the runtime's dev token
issuer, and two OpenAI-compatible stand-ins (``primary`` then ``backup``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import pytest_asyncio
from _inference_api_support import INVOKE, MODEL, PRICE, Harness
from _openai_standin import OpenAIStandIn

from ledgerlens.inference.v1 import inference_pb2_grpc
from ledgerlens.runtime.auth import DevTokenIssuer
from ledgerlens.runtime.testing import EventNames
from ledgerlens.services.inference.app import REVOKED_CONSUMER, run_inference
from ledgerlens.services.inference.settings import Settings


@pytest.fixture(scope="session")
def token_issuer() -> DevTokenIssuer:
    return DevTokenIssuer()


@pytest.fixture
def primary() -> Iterator[OpenAIStandIn]:
    with OpenAIStandIn(default_text="The primary answers.") as standin:
        yield standin


@pytest.fixture
def backup() -> Iterator[OpenAIStandIn]:
    with OpenAIStandIn(default_text="The backup answers.") as standin:
        yield standin


@pytest.fixture
def make_settings(
    nats_url: str,
    token_issuer: DevTokenIssuer,
    tmp_path: Path,
    primary: OpenAIStandIn,
    backup: OpenAIStandIn,
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/inference.db",
            "nats_url": nats_url,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": str(tmp_path / "data"),
            "shutdown_grace_seconds": 5.0,
            "outbox_poll_seconds": 0.2,
            "auth": {"static_jwks": json.dumps(token_issuer.jwks()), "issuer": token_issuer.issuer},
            "providers": [
                {
                    "name": "primary",
                    "kind": "openai",
                    "base_url": primary.base_url,
                    "api_key": "sk-test",
                    "models": [MODEL],
                    "prices": {MODEL: PRICE},
                    "timeout_seconds": 10,
                },
                {
                    "name": "backup",
                    "kind": "openai",
                    "base_url": backup.base_url,
                    "api_key": "sk-test",
                    "models": [MODEL],
                    "prices": {MODEL: PRICE},
                    "timeout_seconds": 10,
                },
                {
                    "name": "local",
                    "kind": "extractive",
                    "models": ["extractive", "all-MiniLM-L6-v2"],
                },
            ],
            "router": {
                "aliases": {
                    "default": [f"primary/{MODEL}", f"backup/{MODEL}"],
                    "embed": ["local/all-MiniLM-L6-v2"],
                    "answer": ["local/extractive"],
                },
                "retry_attempts": 2,
                "backoff_base_seconds": 0.01,
                "backoff_max_seconds": 0.05,
            },
            "rag": {"retrieval_target": "127.0.0.1:9"},
        }
        values.update(overrides)
        return Settings.model_validate(values)

    return make


@pytest_asyncio.fixture
async def start_inference(
    make_settings: Callable[..., Settings],
    event_names: EventNames,
    token_issuer: DevTokenIssuer,
) -> AsyncIterator[Callable[..., Any]]:
    """``async with start_inference(**settings) as harness``: the service in this test's
    event namespace."""
    token = token_issuer.issue("llk_tester", INVOKE, tenant="acme", ttl=3600)

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Harness]:
        settings = make_settings(**overrides)
        async with (
            run_inference(
                settings,
                streams=event_names.platform_streams(),
                revoked_consumer=event_names.consumer(REVOKED_CONSUMER),
                subject=event_names.subject,
            ) as running,
            grpc.aio.insecure_channel(running.grpc_address) as channel,
        ):
            yield Harness(
                running,
                inference_pb2_grpc.InferenceServiceStub(channel),
                (("authorization", f"Bearer {token}"),),
                settings,
                event_names,
                token_issuer,
            )

    yield start


@pytest_asyncio.fixture
async def inference(start_inference: Callable[..., Any]) -> AsyncIterator[Harness]:
    async with start_inference() as harness:
        yield harness

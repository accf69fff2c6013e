"""The OpenAI-compatible provider against a real HTTP stand-in, and the configuration."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _openai_standin import OpenAIStandIn, Script

from ledgerlens.services.inference.model import (
    ChatParams,
    Deadline,
    Delta,
    Message,
    ProviderError,
)
from ledgerlens.services.inference.providers import (
    ExtractiveProvider,
    GatewayConfig,
    OpenAICompatProvider,
    ProviderConfig,
    RouterConfig,
    build_providers,
    check_references,
    parse_retry_after,
)

pytestmark = pytest.mark.integration

PARAMS = ChatParams("m1", (Message("system", "be brief"), Message("user", "what is a block?")))


@pytest.fixture(scope="module")
def standin() -> Iterator[OpenAIStandIn]:
    with OpenAIStandIn(api_key="sk-test", default_text="A block is a batch of transactions.") as s:
        yield s


@pytest.fixture
async def provider(
    standin: OpenAIStandIn, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OpenAICompatProvider]:
    standin.reset()
    monkeypatch.setenv("STANDIN_KEY", "sk-test")
    config = ProviderConfig(
        name="remote",
        kind="openai",
        base_url=standin.base_url,
        api_key_env="STANDIN_KEY",
        models=["m1"],
        timeout_seconds=5,
        max_concurrency=1,
    )
    p = OpenAICompatProvider(config)
    yield p
    await p.aclose()


async def _collect(p: OpenAICompatProvider, deadline: Deadline) -> list[Delta]:
    return [d async for d in p.stream(PARAMS, deadline)]


async def _call(p: OpenAICompatProvider, deadline: Deadline, *, streamed: bool) -> object:
    if streamed:
        return await _collect(p, deadline)
    return await p.chat(PARAMS, deadline)


async def test_unary_and_streamed_text_and_usage_agree(
    provider: OpenAICompatProvider, standin: OpenAIStandIn
) -> None:
    unary = await provider.chat(PARAMS, Deadline.after(5))
    deltas = await _collect(provider, Deadline.after(5))

    assert unary.text == "A block is a batch of transactions."
    assert unary.provider == "remote"
    assert unary.model == "m1"
    assert unary.finish_reason == "stop"
    assert unary.usage is not None
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (6, 7)
    assert "".join(d.text for d in deltas) == unary.text
    assert len(deltas) > 2  # really streamed
    assert all(d.usage is None and d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == unary.usage
    # what reached the server: the prompt, the key, usage asked for in the stream
    chat, stream = standin.requests
    assert chat.body["messages"][1] == {"role": "user", "content": "what is a block?"}
    assert chat.headers["authorization"] == "Bearer sk-test"
    assert stream.body["stream"] is True
    assert stream.body["stream_options"] == {"include_usage": True}


async def test_no_usage_is_none(provider: OpenAICompatProvider, standin: OpenAIStandIn) -> None:
    standin.script(Script.ok("no usage here", usage=None), Script.ok("nor here", usage=None))
    assert (await provider.chat(PARAMS, Deadline.after(5))).usage is None
    deltas = await _collect(provider, Deadline.after(5))
    assert "".join(d.text for d in deltas) == "nor here"
    assert deltas[-1].usage is None
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("script", "status", "retryable", "reason", "retry_after"),
    [
        (Script.error(429, "Rate limit reached", retry_after=0.3), 429, True, "Rate limit", 0.3),
        (Script.error(500, "The server had an error"), 500, True, "server had an error", None),
        (Script.error(503, "overloaded", retry_after="2"), 503, True, "overloaded", 2.0),
        (Script.error(400, "max_tokens is too large"), 400, False, "max_tokens is too", None),
        (Script.error(404, "The model does not exist"), 404, False, "does not exist", None),
        (Script.malformed(), None, True, "malformed", None),
        (Script.truncated(), None, True, "", None),
    ],
)
async def test_failures_are_classified(
    provider: OpenAICompatProvider,
    standin: OpenAIStandIn,
    streamed: bool,
    script: Script,
    status: int | None,
    retryable: bool,
    reason: str,
    retry_after: float | None,
) -> None:
    standin.script(script)
    with pytest.raises(ProviderError) as caught:
        await _call(provider, Deadline.after(5), streamed=streamed)
    err = caught.value
    assert err.provider == "remote"
    assert err.retryable is retryable
    assert err.status == status
    assert reason in err.reason
    assert err.retry_after == retry_after


async def test_wrong_key_is_not_retryable(standin: OpenAIStandIn) -> None:
    config = ProviderConfig(
        name="remote", kind="openai", base_url=standin.base_url, api_key="sk-wrong", models=["m1"]
    )
    p = OpenAICompatProvider(config)
    try:
        with pytest.raises(ProviderError) as caught:
            await p.chat(PARAMS, Deadline.after(5))
    finally:
        await p.aclose()
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert caught.value.reason == "Incorrect API key provided"


@pytest.mark.parametrize("streamed", [False, True])
async def test_timeout_is_retryable_and_bounded_by_the_deadline(
    provider: OpenAICompatProvider, standin: OpenAIStandIn, streamed: bool
) -> None:
    standin.script(Script.slow(3))
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await _call(provider, Deadline.after(0.3), streamed=streamed)
    elapsed = time.monotonic() - started
    assert caught.value.retryable
    assert "timed out" in caught.value.reason
    assert 0.25 <= elapsed < 0.6


async def test_connection_refused_is_retryable() -> None:
    config = ProviderConfig(
        name="gone", kind="openai", base_url="http://127.0.0.1:9/v1", models=["m1"]
    )
    p = OpenAICompatProvider(config)
    try:
        with pytest.raises(ProviderError) as caught:
            await p.chat(PARAMS, Deadline.after(5))
    finally:
        await p.aclose()
    assert caught.value.retryable
    assert "connection" in caught.value.reason.lower()


async def test_max_concurrency_queues_calls(
    provider: OpenAICompatProvider, standin: OpenAIStandIn
) -> None:
    standin.script(Script.slow(0.2, "one"), Script.slow(0.2, "two"))
    started = time.monotonic()
    answers = await asyncio.gather(
        provider.chat(PARAMS, Deadline.after(5)), provider.chat(PARAMS, Deadline.after(5))
    )
    assert sorted(a.text for a in answers) == ["one", "two"]
    assert time.monotonic() - started >= 0.4  # max_concurrency=1: one after the other
    first, second = standin.requests
    assert second.at - first.at >= 0.18


async def test_embed(provider: OpenAICompatProvider, standin: OpenAIStandIn) -> None:
    result = await provider.embed(["gas limit", "base fee"], "m1", Deadline.after(5))
    assert result.dimensions == 8
    assert len(result.vectors) == 2
    assert result.vectors[0] != result.vectors[1]
    assert result.usage is not None
    assert result.usage.prompt_tokens == 4
    assert standin.requests[-1].body["input"] == ["gas limit", "base fee"]
    standin.script(Script.error(429, "later", retry_after=1), endpoint="embeddings")
    with pytest.raises(ProviderError) as caught:
        await provider.embed(["x"], "m1", Deadline.after(5))
    assert (caught.value.retryable, caught.value.retry_after) == (True, 1.0)


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30, abs=1)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0


def test_defaults_need_no_network() -> None:
    config = GatewayConfig()
    assert [(p.name, p.kind) for p in config.providers] == [("local", "extractive")]
    assert config.router.aliases["default"] == ["local/extractive"]
    providers = build_providers(config.providers)
    assert isinstance(providers["local"], ExtractiveProvider)


def test_config_from_yaml_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        """
providers:
  - name: openai
    kind: openai
    base_url: https://api.example.com/v1
    api_key_env: EXAMPLE_KEY
    models: [gpt-small]
    prices: {gpt-small: {input_per_1k: 150, output_per_1k: 600}}
    timeout_seconds: 20
    max_concurrency: 8
  - {name: local, kind: extractive, models: [extractive, all-MiniLM-L6-v2]}
router:
  aliases:
    default: [openai/gpt-small, local/extractive]
    embed: [local/all-MiniLM-L6-v2]
  retry_attempts: 2
"""
    )
    config = GatewayConfig.from_file(path)
    openai = config.providers[0]
    assert openai.price("gpt-small").output_per_1k == 600
    assert openai.price("other").input_per_1k == 0
    assert openai.resolved_api_key({"EXAMPLE_KEY": "sk-1"}) == "sk-1"
    assert config.router.retry_attempts == 2
    assert "sk-1" not in repr(config)

    as_json = config.model_dump_json()
    assert GatewayConfig.from_env({"LEDGERLENS_INFERENCE_GATEWAY_CONFIG": as_json}) == config
    json_path = tmp_path / "gateway.json"
    json_path.write_text(json.dumps(json.loads(as_json)))
    assert GatewayConfig.from_env({"LEDGERLENS_INFERENCE_GATEWAY_CONFIG": str(json_path)}) == config
    assert GatewayConfig.from_env({}) == GatewayConfig()


def test_config_rejects_broken_references() -> None:
    with pytest.raises(ValueError, match="needs base_url"):
        ProviderConfig(name="x", kind="openai", models=["m"])
    with pytest.raises(ValueError, match="unlisted models"):
        ProviderConfig(name="x", kind="extractive", models=["m"], prices={"n": {}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not provider/model"):
        RouterConfig(aliases={"default": ["nomodel"], "embed": ["a/b"]})
    with pytest.raises(ValueError, match="default alias"):
        RouterConfig(aliases={"fast": ["a/b"]})
    local = ProviderConfig(name="local", kind="extractive", models=["extractive"])
    with pytest.raises(ValueError, match="unknown provider"):
        check_references([local], RouterConfig(aliases={"default": ["x/m"], "embed": ["x/m"]}))
    with pytest.raises(ValueError, match="configured twice"):
        check_references([local, local], RouterConfig())

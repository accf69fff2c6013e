"""The router over two real HTTP stand-ins: retries, Retry-After, fallbacks, deadlines,
cooldown and alias resolution."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from _openai_standin import OpenAIStandIn, Script
from prometheus_client import REGISTRY

from ledgerlens.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from ledgerlens.services.inference.model import Deadline, Message
from ledgerlens.services.inference.providers import (
    ExtractiveProvider,
    OpenAICompatProvider,
    Provider,
    ProviderConfig,
    RouterConfig,
    format_passages,
)
from ledgerlens.services.inference.router import Router

pytestmark = pytest.mark.integration

MESSAGES = [Message("user", "what is finality?")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records the waits the router asks for and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture(scope="module")
def standins() -> Iterator[tuple[OpenAIStandIn, OpenAIStandIn]]:
    with (
        OpenAIStandIn(default_text="A says so.") as a,
        OpenAIStandIn(default_text="B says so.") as b,
    ):
        yield a, b


@pytest.fixture
async def providers(
    standins: tuple[OpenAIStandIn, OpenAIStandIn],
) -> AsyncIterator[dict[str, Provider]]:
    out: dict[str, Provider] = {}
    for name, s in zip("ab", standins, strict=True):
        s.reset()
        config = ProviderConfig(
            name=name, kind="openai", base_url=s.base_url, models=["m1", "m2"], timeout_seconds=10
        )
        out[name] = OpenAICompatProvider(config)
    out["local"] = ExtractiveProvider()
    yield out
    for p in out.values():
        await p.aclose()


def _config(**overrides: object) -> RouterConfig:
    base: dict[str, object] = {
        "aliases": {
            "default": ["a/m1", "b/m2"],
            "embed": ["a/m1"],
            "local": ["local/extractive"],
        },
        "retry_attempts": 3,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.05,
        "cooldown_after_failures": 10,
        "cooldown_seconds": 30,
    }
    base.update(overrides)
    return RouterConfig.model_validate(base)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_fallback_reaches_the_second_provider_after_the_first_retries(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(Script.error(500, "a down"), Script.error(502, "a down"), Script.error(503, "a down"))
    sleeps = Sleeps()
    router = Router(providers, _config(), sleep=sleeps)
    fallbacks = _metric("ledgerlens_inference_fallbacks_total", from_provider="a", to_provider="b")
    errors = _metric(
        "ledgerlens_inference_provider_requests_total",
        provider="a",
        model="m1",
        outcome="retryable_error",
    )

    completion = await router.chat("default", MESSAGES, deadline=Deadline.after(5))

    assert (completion.text, completion.provider, completion.model) == ("B says so.", "b", "m2")
    assert (a.calls(), b.calls()) == (3, 1)
    assert b.requests[0].body["model"] == "m2"
    assert len(sleeps.waits) == 2  # between a's three attempts, none before b
    assert all(0 <= w <= 0.05 for w in sleeps.waits)
    assert (
        _metric("ledgerlens_inference_fallbacks_total", from_provider="a", to_provider="b")
        == fallbacks + 1
    )
    assert (
        _metric(
            "ledgerlens_inference_provider_requests_total",
            provider="a",
            model="m1",
            outcome="retryable_error",
        )
        == errors + 3
    )


async def test_retry_after_is_honoured(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(Script.error(429, "slow down", retry_after=0.3))
    sleeps = Sleeps()
    router = Router(providers, _config(), sleep=sleeps, rand=lambda: 0.999)
    completion = await router.chat("default", MESSAGES, deadline=Deadline.after(5))
    assert completion.provider == "a"
    assert sleeps.waits == [0.3]  # max(backoff <= 0.01, Retry-After 0.3)
    assert (a.calls(), b.calls()) == (2, 0)


async def test_retry_after_waits_in_real_time(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, _ = standins
    a.script(Script.error(429, "slow down", retry_after=0.3))
    router = Router(providers, _config())
    await router.chat("default", MESSAGES, deadline=Deadline.after(5))
    first, second = a.requests
    assert second.at - first.at >= 0.3


async def test_the_deadline_is_never_exceeded(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(Script.slow(5))
    router = Router(providers, _config())
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        await router.chat("default", MESSAGES, deadline=Deadline.after(0.5))
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.5 + 0.1
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (a.calls(), b.calls()) == (1, 0)


async def test_no_sleep_past_the_deadline(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(Script.error(429, "come back in 10 s", retry_after=10))
    b.script(Script.error(429, "come back in 7 s", retry_after=7))
    sleeps = Sleeps()
    router = Router(providers, _config(), sleep=sleeps)
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await router.chat("default", MESSAGES, deadline=Deadline.after(2))
    assert time.monotonic() - started < 1
    assert sleeps.waits == []
    assert caught.value.retry_after == 7
    assert "come back in 10 s" in caught.value.message
    assert "come back in 7 s" in caught.value.message


async def test_non_retryable_surfaces_at_once(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(Script.error(400, "messages: content too long"))
    router = Router(providers, _config(), sleep=Sleeps())
    with pytest.raises(FailedPrecondition) as caught:
        await router.chat("default", MESSAGES, deadline=Deadline.after(5))
    assert "messages: content too long" in caught.value.message
    assert caught.value.metadata["status"] == "400"
    assert (a.calls(), b.calls()) == (1, 0)


async def test_every_provider_failing_is_unavailable(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(*[Script.error(500, "a is broken")] * 3)
    b.script(*[Script.malformed()] * 3)
    router = Router(providers, _config(), sleep=Sleeps())
    with pytest.raises(Unavailable) as caught:
        await router.chat("default", MESSAGES, deadline=Deadline.after(5))
    assert "a/m1: a is broken (HTTP 500)" in caught.value.message
    assert "b/m2: malformed" in caught.value.message
    assert caught.value.retry_after is None
    assert (a.calls(), b.calls()) == (3, 3)


async def test_cooldown_skips_a_failing_provider(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, _ = standins
    clock = FakeClock()
    router = Router(
        providers,
        _config(retry_attempts=2, cooldown_after_failures=2, cooldown_seconds=30),
        sleep=Sleeps(),
        clock=clock,
    )
    a.script(Script.error(500, "a down"), Script.error(500, "a down"))
    assert (await router.chat("", MESSAGES, deadline=Deadline.after(5))).provider == "b"
    assert router.cooling("a")

    assert (await router.chat("", MESSAGES, deadline=Deadline.after(5))).provider == "b"
    assert a.calls() == 2  # skipped while cooling

    clock.now += 31
    assert not router.cooling("a")
    assert (await router.chat("", MESSAGES, deadline=Deadline.after(5))).provider == "a"


async def test_a_cooling_provider_is_tried_last_once(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    router = Router(
        providers,
        _config(retry_attempts=2, cooldown_after_failures=2),
        sleep=Sleeps(),
        clock=FakeClock(),
    )
    a.script(Script.error(500, "a down"), Script.error(500, "a down"))
    b.script(Script.error(500, "b down"), Script.error(500, "b down"))
    with pytest.raises(Unavailable):
        await router.chat("", MESSAGES, deadline=Deadline.after(5))
    assert router.cooling("a")
    assert router.cooling("b")
    # both cooling: each is tried once, in chain order, and a recovered one answers
    a.script(Script.error(500, "a still down"))
    completion = await router.chat("", MESSAGES, deadline=Deadline.after(5))
    assert completion.provider == "b"
    assert (a.calls(), b.calls()) == (3, 3)
    assert not router.cooling("b")


async def test_resolution(providers: dict[str, Provider]) -> None:
    router = Router(providers, _config())
    assert [(p.name, m) for p, m in router.resolve("")] == [("a", "m1"), ("b", "m2")]
    assert [(p.name, m) for p, m in router.resolve("", kind="embed")] == [("a", "m1")]
    assert [(p.name, m) for p, m in router.resolve("b/m1")] == [("b", "m1")]
    assert [(p.name, m) for p, m in router.resolve("m2")] == [("a", "m2"), ("b", "m2")]
    for unknown in ("nope", "b/unknown", "c/m1"):
        with pytest.raises(InvalidArgument) as caught:
            router.resolve(unknown, field="chat.model")
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.violations[0][0] == "chat.model"
    with pytest.raises(ValueError, match="no provider"):
        Router(providers, _config(aliases={"default": ["z/m1"], "embed": ["a/m1"]}))


async def test_stream_falls_back_before_the_first_delta(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(*[Script.error(503, "busy")] * 3)
    router = Router(providers, _config(), sleep=Sleeps())
    targets: list[tuple[str, str]] = []
    deltas = [
        d
        async for d in router.stream(
            "default",
            MESSAGES,
            deadline=Deadline.after(5),
            on_target=lambda p, m: targets.append((p, m)),
        )
    ]
    assert "".join(d.text for d in deltas) == "B says so."
    assert deltas[-1].usage is not None
    assert targets == [("b", "m2")]
    assert (a.calls(), b.calls()) == (3, 1)


async def test_stream_failure_after_the_first_delta_surfaces(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, b = standins
    a.script(Script.truncated())
    router = Router(providers, _config(), sleep=Sleeps())
    received: list[str] = []

    async def consume() -> None:
        async for delta in router.stream("default", MESSAGES, deadline=Deadline.after(5)):
            received.append(delta.text)

    with pytest.raises(Unavailable, match="without a finish reason"):
        await consume()
    assert received == ["A"]
    assert (a.calls(), b.calls()) == (1, 0)


async def test_stream_deadline(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, _ = standins
    a.script(Script.slow(5))
    router = Router(providers, _config())
    started = time.monotonic()
    stream = router.stream("default", MESSAGES, deadline=Deadline.after(0.4))
    with pytest.raises(DeadlineExceeded):
        await anext(stream)
    assert time.monotonic() - started < 0.4 + 0.1


async def test_embed_and_local_chat_through_the_router(
    providers: dict[str, Provider], standins: tuple[OpenAIStandIn, OpenAIStandIn]
) -> None:
    a, _ = standins
    a.script(Script.error(500, "once"), endpoint="embeddings")
    router = Router(providers, _config(), sleep=Sleeps())
    result = await router.embed("", ["a", "b"], deadline=Deadline.after(5))
    assert (result.provider, result.model, len(result.vectors)) == ("a", "m1", 2)
    assert a.calls("embeddings") == 2

    prompt = format_passages([(1, "Finality is reached after two epochs.")])
    completion = await router.chat(
        "local",
        [Message("user", f"{prompt}\n\nQuestion: when is finality reached?")],
        deadline=Deadline.after(5),
    )
    assert completion.text == "Finality is reached after two epochs. [1]"
    assert (completion.provider, completion.usage) == ("local", None)

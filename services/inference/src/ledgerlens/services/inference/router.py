"""Model aliases, retries, fallbacks and cooldown over the configured providers.

A model name resolves to a fallback chain of ``(provider, model)`` targets. Each target
gets up to ``retry_attempts`` attempts on retryable failures, with exponential backoff
and full jitter that waits at least the provider's ``Retry-After``; then the next target
is tried. The caller's :class:`Deadline` bounds all of it: no sleep runs past it, every
attempt is cut at it, and running out of it is DEADLINE_EXCEEDED. A non-retryable
failure (400, auth, ...) is FAILED_PRECONDITION at once, with the provider's reason and
no fallback: another provider would refuse the same request, or worse, accept what the
first one refused on purpose. When every target failed retryably: UNAVAILABLE naming
each provider's last reason, with the shortest ``Retry-After`` seen.

Cooldown (a small circuit breaker): after ``cooldown_after_failures`` consecutive
retryable failures a provider is in cooldown for ``cooldown_seconds``. Decision: a
provider in cooldown is tried **last, once** rather than never, so a chain whose every
provider is cooling still answers if one has recovered; one success ends its cooldown,
one more failure after it renews it.

Streams fall back only until the first delta arrived; after that a failure surfaces.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ledgerlens.runtime.errors import (
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from ledgerlens.services.inference.metrics import FALLBACKS, PROVIDER_DURATION, PROVIDER_REQUESTS
from ledgerlens.services.inference.model import (
    ChatParams,
    Completion,
    Deadline,
    Delta,
    EmbedResult,
    Message,
    ProviderError,
)
from ledgerlens.services.inference.providers.base import Provider
from ledgerlens.services.inference.providers.config import RouterConfig

#: the provider metrics live in metrics.py with the gateway's others; re-exported here
__all__ = [
    "FALLBACKS",
    "PROVIDER_DURATION",
    "PROVIDER_REQUESTS",
    "Router",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: remaining time below which the deadline counts as spent: an attempt could not finish,
#: and timers may fire a hair early
_SLACK = 0.005


@dataclass(slots=True)
class _Health:
    failures: int = 0
    cooled_until: float = float("-inf")


def _spent(deadline: Deadline) -> bool:
    return deadline.remaining() <= _SLACK


def _left(deadline: Deadline) -> float | None:
    """Seconds left for ``asyncio.timeout`` (None: no deadline)."""
    remaining = deadline.remaining()
    return None if remaining == float("inf") else max(remaining, 0.0)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


class Router:
    """Routes chat, stream and embed calls to providers; see the module docstring.

    ``sleep`` and ``clock`` (cooldown, durations) and ``rand`` (jitter in [0, 1)) are
    injectable for tests; deadlines always use the real monotonic clock.
    """

    def __init__(
        self,
        providers: Mapping[str, Provider],
        config: RouterConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        for alias, targets in config.aliases.items():
            for target in targets:
                name, _, model = target.partition("/")
                if name not in providers or model not in providers[name].models:
                    raise ValueError(f"alias {alias!r}: no provider {name!r} with model {model!r}")
        self.providers: Mapping[str, Provider] = dict(providers)
        self.config = config
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._health: dict[str, _Health] = {name: _Health() for name in providers}

    # -- resolution ------------------------------------------------------------------

    def resolve(
        self,
        model_or_alias: str,
        *,
        kind: Literal["chat", "embed"] = "chat",
        field: str = "model",
    ) -> list[tuple[Provider, str]]:
        """The fallback chain of ``model_or_alias``: an alias; ``provider/model`` of a
        configured provider listing that model; or a bare model name (every provider
        listing it, in configuration order). Empty means the default alias of ``kind``.
        Unknown: INVALID_ARGUMENT with a violation on ``field``."""
        name = model_or_alias.strip()
        if not name:
            name = (
                self.config.default_chat_alias
                if kind == "chat"
                else self.config.default_embed_alias
            )
        if name in self.config.aliases:
            out = []
            for target in self.config.aliases[name]:
                provider, _, model = target.partition("/")
                out.append((self.providers[provider], model))
            return out
        provider_name, sep, model = name.partition("/")
        if sep:
            direct = self.providers.get(provider_name)
            if direct is not None and model in direct.models:
                return [(direct, model)]
        else:
            found = [(p, name) for p in self.providers.values() if name in p.models]
            if found:
                return found
        known = ", ".join(sorted(self.config.aliases))
        raise InvalidArgument(
            f"unknown model or alias {name!r}",
            [(field, f"unknown model or alias {name!r}; aliases: {known}")],
            reason="UNKNOWN_MODEL",
        )

    def cooling(self, provider: str) -> bool:
        """Whether ``provider`` is in cooldown now."""
        return self._clock() < self._health[provider].cooled_until

    def _ordered(self, targets: Sequence[tuple[Provider, str]]) -> list[tuple[Provider, str]]:
        return sorted(targets, key=lambda t: self.cooling(t[0].name))  # stable

    # -- health and metrics --------------------------------------------------------------

    def _record(self, provider: str, model: str, outcome: str, seconds: float) -> None:
        PROVIDER_REQUESTS.labels(provider, model, outcome).inc()
        PROVIDER_DURATION.labels(provider, model).observe(max(seconds, 0.0))

    def _succeeded(self, provider: str) -> None:
        health = self._health[provider]
        health.failures = 0
        health.cooled_until = float("-inf")

    def _failed(self, provider: str) -> None:
        health = self._health[provider]
        health.failures += 1
        if health.failures >= self.config.cooldown_after_failures:
            health.cooled_until = self._clock() + self.config.cooldown_seconds
            _log.warning(
                "provider %s in cooldown for %.1f s after %d consecutive failures",
                provider,
                self.config.cooldown_seconds,
                health.failures,
            )

    # -- errors --------------------------------------------------------------------------

    @staticmethod
    def _refused(error: ProviderError, model: str) -> FailedPrecondition:
        metadata = {"provider": error.provider, "model": model}
        if error.status is not None:
            metadata["status"] = str(error.status)
        return FailedPrecondition(
            f"provider {error.provider} refused the request: {error.reason}",
            [("PROVIDER_REFUSED", f"{error.provider}/{model}", error.reason)],
            reason="PROVIDER_REFUSED",
            metadata=metadata,
        )

    @staticmethod
    def _describe(failures: Sequence[tuple[str, ProviderError]]) -> str:
        parts = []
        for target, error in failures:
            status = f" (HTTP {error.status})" if error.status is not None else ""
            parts.append(f"{target}: {error.reason}{status}")
        return "; ".join(parts)

    def _unavailable(self, failures: Sequence[tuple[str, ProviderError]]) -> DomainError:
        waits = [e.retry_after for _, e in failures if e.retry_after is not None]
        return Unavailable(
            f"every provider failed: {self._describe(failures)}",
            retry_after=min(waits) if waits else None,
            reason="PROVIDERS_UNAVAILABLE",
            metadata={"providers": ",".join(t for t, _ in failures)},
        )

    @classmethod
    def _deadline(cls, failures: Sequence[tuple[str, ProviderError]]) -> DeadlineExceeded:
        last = f"; {cls._describe(failures)}" if failures else ""
        return DeadlineExceeded(
            f"the deadline ran out before a provider answered{last}", reason="DEADLINE_EXCEEDED"
        )

    # -- the retry loop ------------------------------------------------------------------

    async def _attempt(
        self,
        provider: Provider,
        model: str,
        call: Callable[[], Awaitable[_T]],
        deadline: Deadline,
        *,
        record_ok: bool = True,
    ) -> _T:
        if _spent(deadline):
            raise self._deadline([])
        started = self._clock()
        try:
            # the backstop: whatever a provider does, the attempt ends at the deadline
            async with asyncio.timeout(_left(deadline)):
                result = await call()
        except TimeoutError as exc:
            self._record(provider.name, model, "retryable_error", self._clock() - started)
            self._failed(provider.name)
            raise ProviderError(provider.name, "the deadline ran out", retryable=True) from exc
        except ProviderError as exc:
            outcome = "retryable_error" if exc.retryable else "error"
            self._record(provider.name, model, outcome, self._clock() - started)
            if exc.retryable:
                self._failed(provider.name)
            raise
        self._succeeded(provider.name)
        if record_ok:
            self._record(provider.name, model, "ok", self._clock() - started)
        return result

    def _retrying(self, provider: Provider, deadline: Deadline) -> AsyncRetrying:
        cfg = self.config

        def wait(state: RetryCallState) -> float:
            ceiling = min(
                cfg.backoff_max_seconds, cfg.backoff_base_seconds * 2 ** (state.attempt_number - 1)
            )
            backoff = self._rand() * ceiling  # full jitter
            exc = state.outcome.exception() if state.outcome is not None else None
            retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
            return float(max(backoff, retry_after or 0.0))

        def stop(state: RetryCallState) -> bool:
            return (
                state.attempt_number >= cfg.retry_attempts
                or self.cooling(provider.name)
                # never sleep past the deadline: better to try the next provider now
                or deadline.remaining() - state.upcoming_sleep <= _SLACK
            )

        return AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(_retryable),
            sleep=self._sleep,
            reraise=True,
        )

    async def _with_retries(
        self,
        provider: Provider,
        model: str,
        call: Callable[[], Awaitable[_T]],
        deadline: Deadline,
        *,
        record_ok: bool = True,
    ) -> _T:
        async for attempt in self._retrying(provider, deadline):
            with attempt:
                result = await self._attempt(provider, model, call, deadline, record_ok=record_ok)
            if attempt.retry_state.outcome is not None and not attempt.retry_state.outcome.failed:
                return result
        raise AssertionError("tenacity ended without a result or an exception")  # pragma: no cover

    async def _route(
        self,
        targets: Sequence[tuple[Provider, str]],
        call: Callable[[Provider, str], Awaitable[_T]],
        deadline: Deadline,
        *,
        record_ok: bool = True,
    ) -> tuple[_T, Provider, str]:
        failures: list[tuple[str, ProviderError]] = []
        previous: str | None = None
        for provider, model in self._ordered(targets):
            if _spent(deadline):
                raise self._deadline(failures)
            if previous is not None:
                FALLBACKS.labels(previous, provider.name).inc()
                _log.warning("falling back from provider %s to %s", previous, provider.name)
            try:

                def bound(p: Provider = provider, m: str = model) -> Awaitable[_T]:
                    return call(p, m)

                result = await self._with_retries(
                    provider, model, bound, deadline, record_ok=record_ok
                )
            except ProviderError as exc:
                if not exc.retryable:
                    raise self._refused(exc, model) from exc
                failures.append((f"{provider.name}/{model}", exc))
                previous = provider.name
                continue
            return result, provider, model
        if _spent(deadline):
            raise self._deadline(failures)
        raise self._unavailable(failures)

    # -- public calls ------------------------------------------------------------------

    async def chat(
        self,
        model_or_alias: str,
        messages: Sequence[Message],
        *,
        deadline: Deadline,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> Completion:
        """One completion from the first target of the chain that answers.
        ``Completion.provider``/``.model`` say which one did."""
        params = ChatParams("", tuple(messages), temperature, max_tokens, tuple(stop))
        targets = self.resolve(model_or_alias)

        async def call(provider: Provider, model: str) -> Completion:
            return await provider.chat(replace(params, model=model), deadline)

        completion, _, _ = await self._route(targets, call, deadline)
        return completion

    async def stream(
        self,
        model_or_alias: str,
        messages: Sequence[Message],
        *,
        deadline: Deadline,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        on_target: Callable[[str, str], None] | None = None,
    ) -> AsyncIterator[Delta]:
        """Deltas of one completion; the last carries finish reason and usage.
        ``on_target(provider, model)`` is called once the answering target is known
        (before the first delta is yielded). Close it (``aclose``) if you stop early."""
        params = ChatParams("", tuple(messages), temperature, max_tokens, tuple(stop))
        targets = self.resolve(model_or_alias)

        async def open_stream(
            provider: Provider, model: str
        ) -> tuple[AsyncIterator[Delta], Delta, float]:
            started = self._clock()
            iterator = provider.stream(replace(params, model=model), deadline)
            try:
                first = await anext(iterator)
            except StopAsyncIteration:
                raise ProviderError(
                    provider.name, "malformed stream: no deltas", retryable=True
                ) from None
            except BaseException:
                await _aclose(iterator)
                raise
            return iterator, first, started

        (iterator, first, started), provider, model = await self._route(
            targets, open_stream, deadline, record_ok=False
        )
        if on_target is not None:
            on_target(provider.name, model)
        outcome: str | None = None
        try:
            yield first
            while True:
                try:
                    async with asyncio.timeout(_left(deadline)):
                        delta = await anext(iterator)
                except StopAsyncIteration:
                    break
                yield delta
            outcome = "ok"
        except TimeoutError as exc:
            outcome = "retryable_error"
            self._failed(provider.name)
            raise self._deadline([]) from exc
        except ProviderError as exc:
            outcome = "retryable_error" if exc.retryable else "error"
            if not exc.retryable:
                raise self._refused(exc, model) from exc
            self._failed(provider.name)
            if _spent(deadline):
                raise self._deadline([(f"{provider.name}/{model}", exc)]) from exc
            raise self._unavailable([(f"{provider.name}/{model}", exc)]) from exc
        finally:
            if outcome is not None:
                self._record(provider.name, model, outcome, self._clock() - started)
            await _aclose(iterator)

    async def embed(
        self, model_or_alias: str, texts: Sequence[str], *, deadline: Deadline
    ) -> EmbedResult:
        """Vectors of ``texts`` from the first target of the (embed) chain that answers."""
        targets = self.resolve(model_or_alias, kind="embed")

        async def call(provider: Provider, model: str) -> EmbedResult:
            return await provider.embed(texts, model, deadline)

        result, _, _ = await self._route(targets, call, deadline)
        return result

    async def aclose(self) -> None:
        """Close every provider."""
        for provider in self.providers.values():
            await provider.aclose()


async def _aclose(iterator: AsyncIterator[Delta]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()

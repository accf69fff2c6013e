"""Moderation: the input screen run before any provider call, and the ``Moderate`` RPC.

By default a local rule set (:class:`LocalRuleModerator`) reads regular expressions with
scores from a data file (``data/moderation_rules.json``; another file with
``rules_path``). A category's score is the noisy-OR of the scores of its rules that
match (``1 - prod(1 - s)``), so several weak signals add up; it is flagged at or above
the category's ``threshold`` (else the file's). With ``provider_url`` the
OpenAI-compatible ``POST /v1/moderations`` endpoint is used instead
(:class:`OpenAIModerator`).

A verdict's ``reason`` names categories and rules, never the matched text (which may be
a secret). :func:`screen` raises :class:`PermissionDenied` on the first flagged input.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, Field

from ledgerlens.runtime.errors import PermissionDenied, Unavailable
from ledgerlens.services.inference.metrics import MODERATION_REFUSALS

__all__ = [
    "DEFAULT_RULES_PATH",
    "LOCAL_MODERATOR",
    "CategoryVerdict",
    "LocalRuleModerator",
    "ModerationSettings",
    "Moderator",
    "OpenAIModerator",
    "Verdict",
    "build_moderator",
    "screen",
]

_log = logging.getLogger(__name__)

DEFAULT_RULES_PATH = Path(__file__).resolve().parent / "data" / "moderation_rules.json"
#: ``ModerateResponse.moderator`` of the local rule set
LOCAL_MODERATOR = "local-rules"


class ModerationSettings(BaseModel):
    """Moderation settings (nested into the service's Settings)."""

    #: rules file; None means the bundled ``data/moderation_rules.json``
    rules_path: str | None = None
    #: OpenAI-compatible base URL (e.g. ``https://api.openai.com/v1``); None: local rules
    provider_url: str | None = None
    #: name of the environment variable holding the provider's API key
    provider_api_key_env: str = "OPENAI_API_KEY"
    provider_model: str = "omni-moderation-latest"
    #: name reported as ``ModerateResponse.moderator`` for the provider
    provider_name: str = "openai-moderation"
    #: a provider category is flagged when the provider says so or its score reaches this
    provider_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    timeout_seconds: float = Field(default=10.0, gt=0)


@dataclass(frozen=True, slots=True)
class CategoryVerdict:
    category: str
    #: confidence in [0, 1]
    score: float
    flagged: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict on one input (``ModerationResult``)."""

    index: int
    flagged: bool
    categories: tuple[CategoryVerdict, ...]
    #: human-readable, when flagged; names categories and rules, never the input text
    reason: str = ""


class Moderator(Protocol):
    #: ``ModerateResponse.moderator``
    name: str

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """One verdict per text, in order. Never refuses; it reports."""
        ...


@dataclass(frozen=True, slots=True)
class _Rule:
    id: str
    pattern: re.Pattern[str]
    score: float
    reason: str


@dataclass(frozen=True, slots=True)
class _Category:
    name: str
    threshold: float
    rules: tuple[_Rule, ...]


class LocalRuleModerator:
    """Regex rules with scores, per category, from a JSON file (no network)."""

    name = LOCAL_MODERATOR

    def __init__(self, categories: Sequence[_Category]) -> None:
        self._categories = tuple(categories)

    @classmethod
    def from_file(cls, path: str | Path = DEFAULT_RULES_PATH) -> LocalRuleModerator:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalRuleModerator:
        default_threshold = float(data.get("threshold", 0.5))
        categories: list[_Category] = []
        for name, spec in dict(data["categories"]).items():
            rules = []
            for rule in spec["rules"]:
                flags = 0 if rule.get("case_sensitive") else re.IGNORECASE
                score = float(rule["score"])
                if not 0.0 <= score <= 1.0:
                    raise ValueError(f"moderation rule {name}/{rule['id']}: score not in [0, 1]")
                rules.append(
                    _Rule(
                        id=str(rule["id"]),
                        pattern=re.compile(rule["pattern"], flags | re.DOTALL),
                        score=score,
                        reason=str(rule["reason"]),
                    )
                )
            threshold = float(spec.get("threshold", default_threshold))
            categories.append(_Category(name=name, threshold=threshold, rules=tuple(rules)))
        return cls(categories)

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self._categories)

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        return [self.judge(i, t) for i, t in enumerate(texts)]

    def judge(self, index: int, text: str) -> Verdict:
        verdicts: list[CategoryVerdict] = []
        reasons: list[str] = []
        for category in self._categories:
            miss = 1.0
            matched: list[str] = []
            for rule in category.rules:
                if rule.pattern.search(text):
                    miss *= 1.0 - rule.score
                    matched.append(rule.reason)
            score = round(1.0 - miss, 4)
            flagged = bool(matched) and score >= category.threshold
            verdicts.append(CategoryVerdict(category.name, score, flagged))
            if flagged:
                reasons.append(f"{category.name} ({'; '.join(matched)})")
        flagged_any = bool(reasons)
        reason = "flagged as " + ", ".join(reasons) if flagged_any else ""
        return Verdict(index=index, flagged=flagged_any, categories=tuple(verdicts), reason=reason)


class OpenAIModerator:
    """An OpenAI-compatible ``POST {base_url}/moderations`` endpoint."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        model: str = "omni-moderation-latest",
        name: str = "openai-moderation",
        threshold: float = 0.5,
        timeout_seconds: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._url = base_url.rstrip("/") + "/moderations"
        self._model = model
        self._threshold = threshold
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.AsyncClient(timeout=timeout_seconds)
        self._headers = headers

    async def aclose(self) -> None:
        await self._client.aclose()

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        try:
            response = await self._client.post(
                self._url, json={"model": self._model, "input": list(texts)}, headers=self._headers
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"moderation provider {self.name} unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            retry = 1.0 if response.status_code == 429 or response.status_code >= 500 else None
            raise Unavailable(
                f"moderation provider {self.name} answered HTTP {response.status_code}",
                retry_after=retry,
            )
        try:
            results = response.json()["results"]
            if len(results) != len(texts):
                raise ValueError("result count differs from input count")
            return [self._verdict(i, r) for i, r in enumerate(results)]
        except (ValueError, KeyError, TypeError) as exc:
            raise Unavailable(f"moderation provider {self.name}: malformed body ({exc})") from exc

    def _verdict(self, index: int, result: Mapping[str, Any]) -> Verdict:
        said: Mapping[str, Any] = result.get("categories") or {}
        scores: Mapping[str, Any] = result.get("category_scores") or {}
        verdicts = []
        for name in sorted(set(said) | set(scores)):
            score = float(scores.get(name) or 0.0)
            flagged = bool(said.get(name)) or score >= self._threshold
            verdicts.append(CategoryVerdict(name, round(score, 4), flagged))
        flagged_names = [v.category for v in verdicts if v.flagged]
        flagged_any = bool(result.get("flagged")) or bool(flagged_names)
        reason = ""
        if flagged_any:
            reason = f"flagged by {self.name} as " + (", ".join(flagged_names) or "unsafe")
        return Verdict(index=index, flagged=flagged_any, categories=tuple(verdicts), reason=reason)


def build_moderator(
    settings: ModerationSettings, *, client: httpx.AsyncClient | None = None
) -> Moderator:
    if settings.provider_url:
        return OpenAIModerator(
            settings.provider_url,
            api_key=os.environ.get(settings.provider_api_key_env),
            model=settings.provider_model,
            name=settings.provider_name,
            threshold=settings.provider_threshold,
            timeout_seconds=settings.timeout_seconds,
            client=client,
        )
    return LocalRuleModerator.from_file(settings.rules_path or DEFAULT_RULES_PATH)


async def screen(moderator: Moderator, texts: Sequence[str]) -> list[Verdict]:
    """The input screen before a provider call: :class:`PermissionDenied` (reason
    ``MODERATION_REFUSED``, the verdict's reason in the message) when any text is
    flagged; otherwise the verdicts."""
    verdicts = await moderator.moderate(texts)
    for verdict in verdicts:
        if verdict.flagged:
            categories = ",".join(c.category for c in verdict.categories if c.flagged)
            _log.info(
                "moderation refused input %d (moderator %s, categories %s)",
                verdict.index,
                moderator.name,
                categories,
            )
            source = "local" if isinstance(moderator, LocalRuleModerator) else "provider"
            MODERATION_REFUSALS.labels(source).inc()
            raise PermissionDenied(
                f"input {verdict.index} refused by moderation: {verdict.reason}",
                reason="MODERATION_REFUSED",
                metadata={
                    "moderator": moderator.name,
                    "input_index": str(verdict.index),
                    "categories": categories,
                },
            )
    return verdicts

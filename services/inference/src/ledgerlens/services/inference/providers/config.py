"""Provider and router configuration: which providers the gateway talks to, what their
models cost, and how model names and aliases map onto fallback chains.

The service's settings nest these (``providers: list[ProviderConfig]``,
``router: RouterConfig``); :class:`GatewayConfig` is the same pair on its own, loadable
from a YAML or JSON file (:meth:`GatewayConfig.from_file`) or from an environment
variable holding a path or inline JSON (:meth:`GatewayConfig.from_env`). The defaults
need no network: one ``local`` provider of kind ``extractive`` and the aliases
``default`` -> ``local/extractive`` (chat) and ``embed`` -> ``local/all-MiniLM-L6-v2``.

A file looks like::

    providers:
      - name: openai
        kind: openai
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY        # or api_key: sk-... (a secret, never logged)
        models: [gpt-4o-mini]
        prices: {gpt-4o-mini: {input_per_1k: 150, output_per_1k: 600}}   # micro-USD
        timeout_seconds: 30
        max_concurrency: 64
      - {name: local, kind: extractive, models: [extractive, all-MiniLM-L6-v2]}
    router:
      aliases: {default: [openai/gpt-4o-mini, local/extractive]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = [
    "DEFAULT_CHAT_MODEL",
    "DEFAULT_EMBED_MODEL",
    "ENV_GATEWAY_CONFIG",
    "GatewayConfig",
    "ModelPrice",
    "ProviderConfig",
    "RouterConfig",
    "check_references",
    "default_providers",
]

#: the extractive provider's chat model name
DEFAULT_CHAT_MODEL = "extractive"
#: the shared MiniLM embedder's model name (ledgerlens.embedding.DEFAULT_MODEL)
DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
#: env var read by :meth:`GatewayConfig.from_env`: a file path or inline JSON
ENV_GATEWAY_CONFIG = "LEDGERLENS_INFERENCE_GATEWAY_CONFIG"

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # no "/": "provider/model" must split once


class ModelPrice(BaseModel):
    """Price per 1,000 tokens in micro-USD (1 USD = 1,000,000): integers so sums are exact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1k: int = Field(default=0, ge=0)
    output_per_1k: int = Field(default=0, ge=0)


class ProviderConfig(BaseModel):
    """One provider: an OpenAI-compatible API or the local extractive answerer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: unique; used in "provider/model", metrics labels and responses
    name: str = Field(pattern=_NAME, max_length=64)
    kind: Literal["openai", "extractive"]
    #: the API root including ``/v1`` (openai only), e.g. ``http://vllm:8000/v1``
    base_url: str | None = None
    #: the key itself (a secret mounted into the env); prefer ``api_key_env``
    api_key: SecretStr | None = None
    #: the name of an env var holding the key, read when the provider is built
    api_key_env: str | None = None
    #: the provider's own model names this gateway may call
    models: list[str] = Field(min_length=1)
    #: per model; a model without an entry costs 0
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    #: bound of one HTTP call (the caller's deadline bounds it further); for a stream,
    #: the longest wait for its next chunk
    timeout_seconds: float = Field(default=60.0, gt=0)
    #: calls in flight to this provider at once (more wait, within their deadline)
    max_concurrency: int = Field(default=32, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"provider {self.name!r}: kind openai needs base_url")
        unknown = sorted(set(self.prices) - set(self.models))
        if unknown:
            raise ValueError(f"provider {self.name!r}: prices for unlisted models {unknown}")
        return self

    def resolved_api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The API key: ``api_key``, else the value of the ``api_key_env`` variable."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return (os.environ if environ is None else environ).get(self.api_key_env)
        return None

    def price(self, model: str) -> ModelPrice:
        return self.prices.get(model, ModelPrice())


class RouterConfig(BaseModel):
    """Aliases, fallback chains, retries and cooldown of the router."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: alias -> "provider/model" targets in fallback order
    aliases: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "default": [f"local/{DEFAULT_CHAT_MODEL}"],
            "embed": [f"local/{DEFAULT_EMBED_MODEL}"],
        }
    )
    #: the alias an empty chat/answer ``model`` means
    default_chat_alias: str = "default"
    #: the alias an empty embed ``model`` means
    default_embed_alias: str = "embed"
    #: attempts per target (the first call included) before the next target
    retry_attempts: int = Field(default=3, ge=1)
    #: backoff before retry k is uniform in [0, min(max, base * 2**(k-1))] (full
    #: jitter), and at least the provider's Retry-After
    backoff_base_seconds: float = Field(default=0.2, gt=0)
    backoff_max_seconds: float = Field(default=5.0, gt=0)
    #: consecutive retryable failures that put a provider in cooldown
    cooldown_after_failures: int = Field(default=5, ge=1)
    #: how long a provider in cooldown is tried only after every other target
    cooldown_seconds: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        for alias, targets in self.aliases.items():
            if not targets:
                raise ValueError(f"alias {alias!r} has no targets")
            for target in targets:
                provider, sep, model = target.partition("/")
                if not (sep and provider and model):
                    raise ValueError(f"alias {alias!r}: target {target!r} is not provider/model")
        for name in (self.default_chat_alias, self.default_embed_alias):
            if name not in self.aliases:
                raise ValueError(f"default alias {name!r} is not among the aliases")
        return self


def default_providers() -> list[ProviderConfig]:
    """The no-network default: the extractive answerer and the local MiniLM embedder."""
    return [
        ProviderConfig(
            name="local", kind="extractive", models=[DEFAULT_CHAT_MODEL, DEFAULT_EMBED_MODEL]
        )
    ]


def check_references(providers: Sequence[ProviderConfig], router: RouterConfig) -> None:
    """Raise ``ValueError`` unless provider names are unique and every alias target names a
    configured provider and one of its models (call it from the settings' validator)."""
    by_name: dict[str, ProviderConfig] = {}
    for p in providers:
        if p.name in by_name:
            raise ValueError(f"provider {p.name!r} is configured twice")
        by_name[p.name] = p
    for alias, targets in router.aliases.items():
        for target in targets:
            provider, _, model = target.partition("/")
            if provider not in by_name:
                raise ValueError(f"alias {alias!r}: unknown provider {provider!r}")
            if model not in by_name[provider].models:
                raise ValueError(f"alias {alias!r}: provider {provider!r} lists no {model!r}")


class GatewayConfig(BaseModel):
    """Providers and router together, as a file or an env var holds them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: list[ProviderConfig] = Field(default_factory=default_providers)
    router: RouterConfig = Field(default_factory=RouterConfig)

    @model_validator(mode="after")
    def _check(self) -> Self:
        check_references(self.providers, self.router)
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> GatewayConfig:
        """Load a ``.yaml``/``.yml`` or ``.json`` file (YAML is a superset: any other
        suffix is read as YAML)."""
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data or {})

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, var: str = ENV_GATEWAY_CONFIG
    ) -> GatewayConfig:
        """From ``$var``: inline JSON (starts with ``{``) or a file path; unset: defaults."""
        value = (os.environ if environ is None else environ).get(var, "").strip()
        if not value:
            return cls()
        if value.startswith("{"):
            return cls.model_validate_json(value)
        return cls.from_file(value)

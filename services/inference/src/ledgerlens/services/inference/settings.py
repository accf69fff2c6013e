"""The inference service's settings (env prefix ``LEDGERLENS_INFERENCE_``).

Nested groups use ``__`` in env names, e.g. ``LEDGERLENS_INFERENCE_LIMITS__KEY_REQUESTS_PER_MINUTE``
or ``LEDGERLENS_INFERENCE_RAG__RETRIEVAL_TARGET``. Providers and router come from
``providers``/``router`` (JSON in env) or, when ``providers_file`` is set, from that YAML or
JSON file (see ``providers/config.py`` for its shape), which then replaces both.
"""

from __future__ import annotations

import os
from typing import Any, Self

from pydantic import BaseModel, Field, model_validator

from ledgerlens.runtime.settings import ServiceSettings, service_config
from ledgerlens.services.inference.cache import CacheSettings
from ledgerlens.services.inference.idempotency import IdempotencySettings
from ledgerlens.services.inference.limits import LimitSettings
from ledgerlens.services.inference.moderation import ModerationSettings
from ledgerlens.services.inference.providers.config import (
    GatewayConfig,
    ProviderConfig,
    RouterConfig,
    check_references,
    default_providers,
)
from ledgerlens.services.inference.rag import DEFAULT_PROMPT_TOKEN_BUDGET

__all__ = ["DEVSTACK_RETRIEVAL_TARGET_ENV", "RagSettings", "Settings"]

#: where ``make up`` (ledgerlens.runtime.devstack) puts retrieval's address
DEVSTACK_RETRIEVAL_TARGET_ENV = "LEDGERLENS_DEVSTACK_RETRIEVAL_GRPC_TARGET"


class RagSettings(BaseModel):
    """Grounded answers: where retrieval is and how large a prompt may be."""

    #: retrieval's gRPC ``host:port``; unset: the dev stack's
    #: ``LEDGERLENS_DEVSTACK_RETRIEVAL_GRPC_TARGET``, else ``127.0.0.1:50053``
    retrieval_target: str = ""
    #: a Search that takes longer fails the answer with UNAVAILABLE (the caller's
    #: deadline bounds it further)
    retrieval_timeout_seconds: float = Field(default=10.0, gt=0)
    #: prompt tokens (system + user messages, passages included)
    prompt_token_budget: int = Field(default=DEFAULT_PROMPT_TOKEN_BUDGET, ge=64)

    @model_validator(mode="after")
    def _default_target(self) -> Self:
        if not self.retrieval_target:
            self.retrieval_target = (
                os.environ.get(DEVSTACK_RETRIEVAL_TARGET_ENV, "").strip() or "127.0.0.1:50053"
            )
        return self


class Settings(ServiceSettings):
    model_config = service_config("inference")

    service_name: str = "inference"
    grpc_port: int = Field(default=50054, ge=0, le=65535)
    http_port: int = Field(default=8084, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///.data/inference.db"
    data_dir: str = ".data/inference"

    #: a YAML or JSON file with ``providers`` and ``router``; replaces both when set
    providers_file: str | None = None
    providers: list[ProviderConfig] = Field(default_factory=default_providers)
    router: RouterConfig = Field(default_factory=RouterConfig)

    limits: LimitSettings = Field(default_factory=LimitSettings)
    idempotency: IdempotencySettings = Field(default_factory=IdempotencySettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)
    rag: RagSettings = Field(default_factory=RagSettings)

    #: outbox relay poll interval (it is also nudged after every commit)
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    #: how often the revoked API keys are reloaded from the database (replicas that did
    #: not receive an ``identity.key.revoked`` event refuse the key within this time)
    revocation_refresh_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _load_providers_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("providers_file"):
            loaded = GatewayConfig.from_file(str(data["providers_file"]))
            data = {**data, "providers": loaded.providers, "router": loaded.router}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        check_references(self.providers, self.router)
        # one redis_url for the service turns every shared-state backend to Redis
        if self.redis_url:
            for group in (self.limits, self.idempotency, self.cache):
                if group.redis_url is None:
                    group.redis_url = self.redis_url
        return self

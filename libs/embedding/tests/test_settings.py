"""EmbeddingSettings: defaults, validation, and its env names when nested in a service."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from ledgerlens.embedding import (
    DEFAULT_MAX_TOKENS,
    EmbeddingSettings,
    default_model_path,
    default_tokenizer_path,
)
from ledgerlens.runtime.settings import ServiceSettings, service_config


class IngestionSettings(ServiceSettings):
    model_config = service_config("ingestion")
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)


def test_defaults_are_the_bundled_model() -> None:
    settings = EmbeddingSettings()
    assert settings.provider == "local"
    assert settings.model == "all-MiniLM-L6-v2"
    assert settings.dimensions == 384
    assert settings.batch_size == 32
    assert settings.max_tokens is None
    assert DEFAULT_MAX_TOKENS == 254


def test_bundled_model_files_exist() -> None:
    assert (default_model_path() / "model.safetensors").is_file()
    assert default_tokenizer_path().is_file()


def test_openai_needs_base_url() -> None:
    with pytest.raises(ValidationError, match="needs base_url"):
        EmbeddingSettings(provider="openai")


def test_openai_with_another_model_needs_its_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tokenizer_path"):
        EmbeddingSettings(provider="openai", base_url="http://tei/v1", model="bge-small-en")
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text("{}")
    settings = EmbeddingSettings(
        provider="openai",
        base_url="http://tei/v1",
        model="bge-small-en",
        tokenizer_path=tokenizer_json,
        max_tokens=510,
    )
    assert settings.tokenizer_path == tokenizer_json


def test_local_with_another_model_needs_its_path() -> None:
    with pytest.raises(ValidationError, match="model_path"):
        EmbeddingSettings(model="bge-small-en")


def test_base_url_keeps_its_path_without_a_trailing_slash() -> None:
    settings = EmbeddingSettings(provider="openai", base_url="http://tei:80/v1/")
    assert settings.base_url == "http://tei/v1"
    assert EmbeddingSettings(provider="openai", base_url="http://tei:8080").base_url == (
        "http://tei:8080"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("dimensions", 0), ("max_retries", -1), ("torch_threads", 0)],
)
def test_rejects_nonsense(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        EmbeddingSettings.model_validate({field: value})


def test_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="batchsize"):
        EmbeddingSettings.model_validate({"batchsize": 3})


def test_nested_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGERLENS_INGESTION_EMBEDDING__PROVIDER", "openai")
    monkeypatch.setenv("LEDGERLENS_INGESTION_EMBEDDING__BASE_URL", "http://tei:80/v1")
    monkeypatch.setenv("LEDGERLENS_INGESTION_EMBEDDING__API_KEY", "sk-very-secret")
    monkeypatch.setenv("LEDGERLENS_INGESTION_EMBEDDING__BATCH_SIZE", "32")
    monkeypatch.setenv("LEDGERLENS_INGESTION_EMBEDDING__TIMEOUT_SECONDS", "5")
    settings = IngestionSettings().embedding
    assert settings.provider == "openai"
    assert settings.base_url == "http://tei/v1"
    assert settings.batch_size == 32
    assert settings.timeout_seconds == 5.0
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)


def test_nested_env_validation_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEDGERLENS_INGESTION_EMBEDDING__PROVIDER", "openai")
    with pytest.raises(ValidationError, match="needs base_url"):
        IngestionSettings()


@pytest.mark.parametrize("url", ["tei:80/v1", "ftp://tei/v1", ""])
def test_base_url_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError, match="base_url"):
        EmbeddingSettings(provider="openai", base_url=url)

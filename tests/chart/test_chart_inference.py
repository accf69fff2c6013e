"""inference as deployed: retrieval target, service token from a Secret, the gateway
config (providers/router) as a mounted ConfigMap without secrets, Redis in prod."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from _helm import CHART_DIR, VALUES_DEV, VALUES_PROD, RenderError, render
from _renders import Rendered
from test_chart_workloads import main_container, pod_spec, service_env

from ledgerlens.services.inference.providers.config import (
    GatewayConfig,
    ProviderConfig,
    RouterConfig,
)
from ledgerlens.services.inference.settings import Settings

P = "LEDGERLENS_INFERENCE_"
TOKEN = P + "SERVICE_TOKEN"
GATEWAY_CM = "ledgerlens-inference-gateway"


def gateway_file(rendered: Rendered) -> tuple[str, dict[str, Any]]:
    """(path the service reads, the parsed file) of the mounted gateway ConfigMap."""
    config, _ = service_env(rendered, "inference")
    path = config[P + "PROVIDERS_FILE"]
    spec = pod_spec(rendered.workload("inference"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in [*spec["containers"], *spec.get("initContainers", [])]:
        # migrate loads the same Settings, so it needs the file too
        mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert len(mounts) == 1, container["name"]
        assert mounts[0]["readOnly"] is True
        volume = volumes[mounts[0]["name"]]
        assert volume["configMap"]["name"] == GATEWAY_CM
        key = path.removeprefix(mounts[0]["mountPath"] + "/")
    data = rendered.get("ConfigMap", GATEWAY_CM)["data"]
    assert set(data) == {key}
    return path, yaml.safe_load(data[key])


def test_retrieval_target_is_the_releases_retrieval_service(rendered: Rendered) -> None:
    config, _ = service_env(rendered, "inference")
    service = rendered.get("Service", "ledgerlens-retrieval")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert config[P + "RAG__RETRIEVAL_TARGET"] == f"ledgerlens-retrieval.ledgerlens.svc:{grpc_port}"
    # ...with its own token, traded for its client credentials at this release's identity
    identity_http = rendered.values["services"]["identity"]["httpPort"]
    assert config[P + "SERVICE_TOKEN_URL"] == (
        f"http://ledgerlens-identity.ledgerlens.svc:{identity_http}/oauth/token"
    )
    assert "rag" in Settings.model_fields  # the setting the name comes from


@pytest.mark.parametrize("name", ["prod", "dev-gateway"])
def test_gateway_config_is_a_mounted_configmap_without_secrets(
    renders: dict[str, Rendered], name: str
) -> None:
    rendered = renders[name]
    path, data = gateway_file(rendered)
    assert path.endswith(".yaml")  # GatewayConfig.from_file reads YAML by suffix
    # exactly what the values say, and what the service itself accepts
    assert data == rendered.values["services"]["inference"]["gatewayConfig"]
    loaded = GatewayConfig.model_validate(data)
    assert {p.name for p in loaded.providers} >= {"local"}
    # keys by reference only: no api_key, no value of any Secret of the release
    for provider in data["providers"]:
        assert "api_key" not in provider
    text = json.dumps(data)
    for secret in rendered.of_kind("Secret"):
        for value in (secret.get("stringData") or {}).values():
            assert str(value) not in text or len(str(value)) < 4
    assert "sk-" not in text
    # a change of the file rolls the pods
    annotations = rendered.workload("inference")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/gateway" in annotations


def test_prod_provider_keys_and_token_come_from_the_platforms_secret(
    renders: dict[str, Rendered],
) -> None:
    prod = renders["prod"]
    inference = prod.values["services"]["inference"]
    config, secret = service_env(prod, "inference")
    _, data = gateway_file(prod)
    key_envs = {p["api_key_env"] for p in data["providers"] if p.get("api_key_env")}
    assert key_envs, "prod's example names its provider key by env var"
    refs = [r["secretRef"]["name"] for r in main_container(prod, "inference")["envFrom"][2:]]
    assert inference["existingSecret"] in refs
    assert inference["existingSecret"] != "ledgerlens-inference"  # not the chart's own Secret
    for name in (TOKEN, *key_envs):
        assert name not in config
        assert name not in secret  # the platform's Secret holds them, not the chart
    for cm in prod.of_kind("ConfigMap"):
        assert TOKEN not in (cm.get("data") or {})
    # Redis for limits, idempotency and the cache: its URL from externalRedis' Secret
    assert prod.values["externalRedis"]["existingSecret"] in refs
    assert P + "REDIS_URL" not in config


def test_service_token_from_secret_env_lands_in_the_charts_secret(
    renders: dict[str, Rendered],
) -> None:
    config, secret = service_env(renders["dev-gateway"], "inference")
    assert secret[TOKEN] == "dev-token"
    assert TOKEN not in config


def test_dev_runs_the_extractive_default_without_redis(renders: dict[str, Rendered]) -> None:
    dev = renders["dev"]
    assert dev.workload("inference")["spec"]["replicas"] == 1
    config, secret = service_env(dev, "inference")
    assert P + "PROVIDERS_FILE" not in config  # Settings' default: local/extractive
    assert not [o for o in dev.of_kind("ConfigMap") if o["metadata"]["name"] == GATEWAY_CM]
    assert P + "REDIS_URL" not in config
    assert P + "REDIS_URL" not in secret
    assert main_container(dev, "inference")["envFrom"][2:] == []  # no platform Secret
    assert RouterConfig().aliases["default"] == ["local/extractive"]


def test_prod_scales_like_the_others(renders: dict[str, Rendered]) -> None:
    prod = renders["prod"]
    assert prod.workload("inference")["kind"] == "Rollout"
    hpa = prod.get("HorizontalPodAutoscaler", "ledgerlens-inference")
    assert hpa["spec"]["minReplicas"] >= 2
    prod.get("PodDisruptionBudget", "ledgerlens-inference")
    prod.get("AnalysisTemplate", "ledgerlens-inference-canary")


def _schema_gateway() -> dict[str, Any]:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    inference = schema["properties"]["services"]["properties"]["inference"]["properties"]
    gateway: dict[str, Any] = inference["gatewayConfig"]
    return gateway


def test_schema_follows_the_gateway_config_models() -> None:
    gateway = _schema_gateway()
    assert set(gateway["properties"]) == set(GatewayConfig.model_fields)
    provider = gateway["properties"]["providers"]["items"]["properties"]
    # every field but the inline key, which a ConfigMap must never hold
    assert set(provider) == set(ProviderConfig.model_fields) - {"api_key"}
    assert set(gateway["properties"]["router"]["properties"]) == set(RouterConfig.model_fields)


OPENAI = {
    "name": "openai",
    "kind": "openai",
    "base_url": "https://api.openai.com/v1",
    "models": ["gpt-4o-mini"],
}
ROUTER = {"aliases": {"default": ["openai/gpt-4o-mini"], "embed": ["openai/gpt-4o-mini"]}}


@pytest.mark.parametrize(
    ("files", "set_values", "message"),
    [
        (
            [VALUES_DEV],
            {
                "services.inference.gatewayConfig": {
                    "providers": [{**OPENAI, "api_key": "sk-secret"}],
                    "router": ROUTER,
                }
            },
            "additional properties 'api_key' not allowed",
        ),
        (
            [VALUES_DEV],
            {
                "services.inference.gatewayConfig": {
                    "providers": [{**OPENAI, "api_key_env": "OPENAI_API_KEY"}],
                    "router": ROUTER,
                }
            },
            "reads its key from OPENAI_API_KEY: set services.inference.existingSecret",
        ),
        (
            [VALUES_DEV],
            {"services.inference.env": {TOKEN: "in-a-configmap"}},
            "invalid propertyName 'LEDGERLENS_INFERENCE_SERVICE_TOKEN'",
        ),
        (
            [VALUES_DEV],
            {"services.inference.existingSecret": "ledgerlens-inference"},
            "is the Secret this chart renders for the service",
        ),
        (
            [VALUES_PROD],
            {"externalRedis.enabled": False},
            "services.inference runs more than one replica: set externalRedis.enabled",
        ),
    ],
    ids=["inline-key", "key-without-secret", "token-in-env", "own-secret", "replicas-no-redis"],
)
def test_secrets_stay_out_of_configmaps_and_replicas_share_state(
    files: list[Any], set_values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError) as caught:
        render(files, set_values)
    assert message in str(caught.value)

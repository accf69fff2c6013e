"""Every service gets the same shape: workload, probes, security, env wiring, scaling,
canary, monitoring, and the helm test pod."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from _helm import CHART_DIR, render
from _renders import Rendered
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel
from service_graph import SERVICE_PORTS

from ledgerlens.runtime.settings import ServiceSettings

REPO = CHART_DIR.parents[1]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def main_container(rendered: Rendered, svc: str) -> dict[str, Any]:
    containers = pod_spec(rendered.workload(svc))["containers"]
    assert [c["name"] for c in containers] == [svc]
    return containers[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- settings: one name everywhere ---------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for a in typing.get_args(annotation) if (m := _model_of(a))]
        return models[0] if models else None
    return None


def settings_class(svc: str) -> type[ServiceSettings]:
    """The service's Settings (every service has written its own)."""
    module = importlib.import_module(f"ledgerlens.services.{svc}.settings")
    cls: type[ServiceSettings] = module.Settings
    assert issubclass(cls, ServiceSettings)
    return cls


def settings_env_names(svc: str) -> set[str]:
    """Every env var the service's pydantic settings read (nested fields with "__")."""
    prefix = f"LEDGERLENS_{svc.upper()}_"
    names: set[str] = set()

    def walk(model: type[BaseModel], path: str) -> None:
        for field_name, field in model.model_fields.items():
            name = f"{path}{field_name.upper()}"
            names.add(prefix + name)
            if nested := _model_of(field.annotation):
                walk(nested, name + "__")

    walk(settings_class(svc), "")
    return names


def test_settings_env_names_are_derived_from_the_code() -> None:
    names = settings_env_names("retrieval")
    assert {
        "LEDGERLENS_RETRIEVAL_QDRANT__URL",
        "LEDGERLENS_RETRIEVAL_AUTH__JWKS_URL",
        "LEDGERLENS_RETRIEVAL_BACKEND",
        "LEDGERLENS_RETRIEVAL_DATABASE_URL",
    } <= names
    assert "LEDGERLENS_RETRIEVAL_QDRANT_URL" not in names
    assert "LEDGERLENS_LEDGER_FABRIC__PEER_ADDRESS" in settings_env_names("ledger")


def service_env(rendered: Rendered, svc: str) -> tuple[dict[str, str], dict[str, str]]:
    """(ConfigMap data, Secret stringData) the service's container reads with envFrom."""
    container = main_container(rendered, svc)
    refs = container["envFrom"]
    assert refs[0] == {"configMapRef": {"name": f"ledgerlens-{svc}"}}
    assert refs[1] == {"secretRef": {"name": f"ledgerlens-{svc}"}}
    # settings come from the ConfigMap and Secret, except per-pod ones (pod_env)
    assert set(pod_env(rendered, svc)) <= {f"LEDGERLENS_{svc.upper()}_REPLICA"}
    config = rendered.get("ConfigMap", f"ledgerlens-{svc}")["data"]
    secret = rendered.get("Secret", f"ledgerlens-{svc}").get("stringData") or {}
    return config, secret


def pod_env(rendered: Rendered, svc: str) -> dict[str, dict[str, Any]]:
    """The container's own ``env`` (settings that differ per pod), by name."""
    return {e["name"]: e for e in main_container(rendered, svc).get("env", [])}


def test_env_names_are_the_settings_field_names(rendered: Rendered) -> None:
    for svc in rendered.enabled:
        config, secret = service_env(rendered, svc)
        names = set(config) | set(secret) | set(pod_env(rendered, svc))
        unknown = names - settings_env_names(svc)
        assert not unknown, f"{svc}: {sorted(unknown)} are not settings of the service"
        assert not set(config) & set(secret)


def test_env_wiring(rendered: Rendered) -> None:
    values = rendered.values
    for svc in rendered.enabled:
        p = f"LEDGERLENS_{svc.upper()}_"
        config, secret = service_env(rendered, svc)
        sv = values["services"][svc]
        assert config[p + "HOST"] == "0.0.0.0"
        assert config[p + "GRPC_PORT"] == str(sv["grpcPort"])
        assert config[p + "HTTP_PORT"] == str(sv["httpPort"])
        mounts = {m["name"]: m["mountPath"] for m in main_container(rendered, svc)["volumeMounts"]}
        assert config[p + "DATA_DIR"] == mounts["data"]
        assert config[p + "NATS_URL"].startswith("nats://")
        # the database URL is a secret, from the chart's Secret or the platform's
        assert p + "DATABASE_URL" not in config
        if (
            values["externalPostgresql"]["enabled"]
            and values["externalPostgresql"]["existingSecret"]
        ):
            names = [r["secretRef"]["name"] for r in main_container(rendered, svc)["envFrom"][2:]]
            assert values["externalPostgresql"]["existingSecret"] in names
        elif values["externalPostgresql"]["enabled"]:
            assert secret[p + "DATABASE_URL"].startswith("postgresql+asyncpg://")
        else:
            assert secret[p + "DATABASE_URL"] == f"sqlite+aiosqlite:///{mounts['data']}/{svc}.db"
        if svc == "identity":
            assert p + "AUTH__JWKS_URL" not in config  # identity reads its own keys
        else:
            assert config[p + "AUTH__JWKS_URL"] == (
                f"http://ledgerlens-identity.ledgerlens.svc:{values['services']['identity']['httpPort']}"
                "/.well-known/jwks.json"
            )
    if "retrieval" in rendered.enabled:
        config, _ = service_env(rendered, "retrieval")
        backend = values["services"]["retrieval"]["backend"]
        assert config["LEDGERLENS_RETRIEVAL_BACKEND"] == backend
        assert ("LEDGERLENS_RETRIEVAL_QDRANT__URL" in config) == (backend == "qdrant")


def test_retrieval_replicas_are_named_after_their_pod(renders: dict[str, Rendered]) -> None:
    # each retrieval replica keeps a whole index, so it needs durables of its own
    name = "LEDGERLENS_RETRIEVAL_REPLICA"
    prod = renders["prod"]
    retrieval = prod.values["services"]["retrieval"]
    assert retrieval["replicas"] > 1 or retrieval["autoscaling"]["maxReplicas"] > 1
    assert pod_env(prod, "retrieval") == {
        name: {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    }
    for svc in prod.enabled:
        if svc != "retrieval":
            assert not pod_env(prod, svc), f"{svc} has no per-pod settings"
    config, _ = service_env(prod, "retrieval")
    assert name not in config  # the same for every pod: it would name one shared durable
    dev = renders["dev"]
    assert dev.values["services"]["retrieval"]["replicas"] == 1
    assert not pod_env(dev, "retrieval")
    assert name not in service_env(dev, "retrieval")[0]


def test_jwks_path_is_identitys_route() -> None:
    rest = (REPO / "services/identity/src/ledgerlens/services/identity/rest.py").read_text()
    assert '@router.get("/.well-known/jwks.json"' in rest


# --- workload shape --------------------------------------------------------------------


def test_every_service_is_enabled(renders: dict[str, Rendered]) -> None:
    for name in ("default", "dev", "prod"):
        assert renders[name].enabled == sorted(SERVICE_PORTS)
        names = {
            o["metadata"]["name"]
            for o in renders[name].objects
            if o["kind"] in ("Deployment", "Rollout") and o["metadata"]["name"] != "ledgerlens-nats"
        }
        assert names == {f"ledgerlens-{s}" for s in renders[name].enabled}
    inference = renders["prod"].values["services"]["inference"]
    assert inference["image"]["repository"] == "ledgerlens-inference"
    assert renders["prod"].workload("inference")["kind"] == "Rollout"


def test_entry_point_and_migrations(rendered: Rendered) -> None:
    for svc in rendered.enabled:
        spec = pod_spec(rendered.workload(svc))
        main = main_container(rendered, svc)
        command = ["python", "-m", f"ledgerlens.services.{svc}"]
        assert main["command"] == command
        assert main["args"] == ["serve"]
        assert spec["initContainers"][0]["command"] == command
        assert spec["initContainers"][0]["args"] == ["migrate"]
        source = Path(importlib.util.find_spec(f"ledgerlens.services.{svc}.__main__").origin)
        assert "service_cli(" in source.read_text()  # gives serve and migrate


def test_ports_and_probes(rendered: Rendered) -> None:
    for svc in rendered.enabled:
        sv = rendered.values["services"][svc]
        assert (sv["grpcPort"], sv["httpPort"]) == tuple(SERVICE_PORTS[svc].values())
        main = main_container(rendered, svc)
        assert {p["name"]: p["containerPort"] for p in main["ports"]} == {
            "grpc": sv["grpcPort"],
            "http": sv["httpPort"],
        }
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert main[probe]["grpc"] == {"port": sv["grpcPort"]}, (svc, probe)
        startup = main["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_service_ports_carry_app_protocol(rendered: Rendered) -> None:
    for svc in rendered.enabled:
        service = rendered.get("Service", f"ledgerlens-{svc}")
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["appProtocol"] == "grpc"
        assert ports["http"]["appProtocol"] == "http"
        assert ports["grpc"]["port"] == rendered.values["services"][svc]["grpcPort"]
        pod_labels = rendered.workload(svc)["spec"]["template"]["metadata"]["labels"]
        assert matches(service["spec"]["selector"], pod_labels)


def test_security_context(rendered: Rendered) -> None:
    for svc in rendered.enabled:
        spec = pod_spec(rendered.workload(svc))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == f"ledgerlens-{svc}"
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["runAsUser"] == 10001
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["tmp"] == "/tmp"
        assert "emptyDir" in volumes["tmp"]
        assert "emptyDir" in volumes["data"]


def test_prod_shape_pdb_spread_replicas(renders: dict[str, Rendered]) -> None:
    prod = renders["prod"]
    for svc in prod.enabled:
        labels = prod.workload(svc)["spec"]["template"]["metadata"]["labels"]
        pdb = prod.get("PodDisruptionBudget", f"ledgerlens-{svc}")
        assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
        assert pdb["spec"]["maxUnavailable"] == 1
        spread = pod_spec(prod.workload(svc))["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        assert all(matches(c["labelSelector"]["matchLabels"], labels) for c in spread)
        sv = prod.values["services"][svc]
        assert sv["replicas"] >= 2
        assert sv["autoscaling"]["minReplicas"] >= 2
        # the HPA owns the replica count
        assert "replicas" not in prod.workload(svc)["spec"]


def test_dev_shape(renders: dict[str, Rendered]) -> None:
    dev = renders["dev"]
    kinds = {o["kind"] for o in dev.objects}
    assert not kinds & {
        "Rollout",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    }
    for svc in dev.enabled:
        assert dev.workload(svc)["spec"]["replicas"] == 1
    nats = dev.get("Deployment", "ledgerlens-nats")
    assert "--jetstream" in nats["spec"]["template"]["spec"]["containers"][0]["args"]
    config, _ = service_env(dev, "ledger")
    assert config["LEDGERLENS_LEDGER_NATS_URL"] == "nats://ledgerlens-nats.ledgerlens.svc:4222"


# --- autoscaling ---------------------------------------------------------------------


def adapter_rule(rendered: Rendered) -> dict[str, Any]:
    config = rendered.get("ConfigMap", "ledgerlens-prometheus-adapter-rules")
    rules = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    assert len(rules) == 1
    return rules[0]


def test_hpa_scales_on_p95_latency_and_cpu(renders: dict[str, Rendered]) -> None:
    prod = renders["prod"]
    rule = adapter_rule(prod)
    assert "histogram_quantile(0.95" in rule["metricsQuery"]
    assert "ledgerlens_rpc_server_duration_seconds_bucket" in rule["seriesQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # one source: the chart ships infra/prometheus/adapter-rules.yaml as it is
    infra = yaml.safe_load((REPO / "infra/prometheus/adapter-rules.yaml").read_text())
    assert rule == infra["rules"][0]
    hpas = prod.of_kind("HorizontalPodAutoscaler")
    assert {h["metadata"]["name"] for h in hpas} == {f"ledgerlens-{s}" for s in prod.enabled}
    for hpa in hpas:
        spec = hpa["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Rollout"
        assert spec["scaleTargetRef"]["name"] == hpa["metadata"]["name"]
        pods = [m["pods"] for m in spec["metrics"] if m["type"] == "Pods"]
        assert pods
        assert pods[0]["metric"]["name"] == rule["name"]["as"]
        assert pods[0]["target"] == {"type": "AverageValue", "averageValue": "250m"}
        cpu = [m["resource"] for m in spec["metrics"] if m["type"] == "Resource"]
        assert cpu
        assert cpu[0]["name"] == "cpu"
        assert cpu[0]["target"]["type"] == "Utilization"
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
        assert spec["minReplicas"] >= 2


def test_keda_scaled_object_replaces_the_hpa(renders: dict[str, Rendered]) -> None:
    keda = renders["prod-keda"]
    assert keda.of_kind("HorizontalPodAutoscaler") == []
    for svc in keda.enabled:
        spec = keda.get("ScaledObject", f"ledgerlens-{svc}")["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Rollout",
            "name": f"ledgerlens-{svc}",
        }
        triggers = {t["type"]: t for t in spec["triggers"]}
        prom = triggers["prometheus"]
        assert prom["metricType"] == "Value"
        assert float(prom["metadata"]["threshold"]) == 0.25
        query = prom["metadata"]["query"]
        assert "histogram_quantile(0.95" in query
        assert f'service=~"ledgerlens[.]{svc}[.].+"' in query
        assert triggers["cpu"]["metricType"] == "Utilization"
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60


# --- canary ----------------------------------------------------------------------------


def test_canary_rollout_steps_and_analysis(renders: dict[str, Rendered]) -> None:
    prod = renders["prod"]
    codes = {code.name for code in grpc.StatusCode}
    for svc in prod.enabled:
        rollout = prod.workload(svc)
        canary = rollout["spec"]["strategy"]["canary"]
        weights = [s["setWeight"] for s in canary["steps"] if "setWeight" in s]
        assert weights == [10, 30, 60]
        assert all("pause" in s for s in canary["steps"][1::2])
        name = canary["analysis"]["templates"][0]["templateName"]
        template = prod.get("AnalysisTemplate", name)
        assert [a["name"] for a in canary["analysis"]["args"]] == [
            a["name"] for a in template["spec"]["args"]
        ]
        metrics = {m["name"]: m for m in template["spec"]["metrics"]}
        assert set(metrics) == {"p95-latency", "error-rate"}
        for metric in metrics.values():
            assert metric["failureLimit"] >= 1  # a failed analysis aborts: back to stable
            query = metric["provider"]["prometheus"]["query"]
            assert "ledgerlens_rpc_server_duration_seconds" in query
            assert 'rollouts_pod_template_hash="{{args.canary-hash}}"' in query
            assert f'service=~"ledgerlens[.]{svc}[.].+"' in query
        assert (
            "histogram_quantile(0.95" in metrics["p95-latency"]["provider"]["prometheus"]["query"]
        )
        fault = metrics["error-rate"]["provider"]["prometheus"]["query"]
        fault_codes = fault.split('code=~"')[1].split('"')[0].split("|")
        assert set(fault_codes) <= codes
        assert "INTERNAL" in fault_codes
        assert "OK" not in fault_codes
        monitor = prod.get("ServiceMonitor", f"ledgerlens-{svc}")
        assert monitor["spec"]["podTargetLabels"] == ["rollouts-pod-template-hash"]


def test_service_monitor_scrapes_ops_port(renders: dict[str, Rendered]) -> None:
    for svc in renders["prod"].enabled:
        spec = renders["prod"].get("ServiceMonitor", f"ledgerlens-{svc}")["spec"]
        assert spec["endpoints"][0]["port"] == "http"
        assert spec["endpoints"][0]["path"] == "/metrics"
        # keep the histogram's own "service" label (the gRPC service) on conflicts
        assert spec["endpoints"][0]["honorLabels"] is True


# --- dashboards and rules from infra/ --------------------------------------------------


def test_dashboards_and_rules_come_from_infra(renders: dict[str, Rendered]) -> None:
    assert (CHART_DIR / "files/dashboards").resolve() == REPO / "infra/grafana/dashboards"
    assert (CHART_DIR / "files/rules").resolve() == REPO / "infra/prometheus/rules"
    prod = renders["prod"]
    dashboards = sorted((REPO / "infra/grafana/dashboards").glob("*.json"))
    maps = [
        o
        for o in prod.of_kind("ConfigMap")
        if o["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    assert dashboards
    assert len(maps) == len(dashboards)
    by_file = {next(iter(m["data"])): m for m in maps}
    for path in dashboards:
        assert by_file[path.name]["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(by_file[path.name]["data"][path.name]) == json.loads(path.read_text())
    rules = sorted((REPO / "infra/prometheus/rules").glob("*.yaml"))
    objects = prod.of_kind("PrometheusRule")
    assert rules
    assert len(objects) == len(rules)
    by_source = {o["metadata"]["annotations"]["ledgerlens.io/source"]: o for o in objects}
    for path in rules:
        spec = by_source[f"infra/prometheus/rules/{path.name}"]["spec"]
        assert spec == yaml.safe_load(path.read_text())


# --- helm test ---------------------------------------------------------------------------


def helm_test_pod(rendered: Rendered) -> dict[str, Any]:
    pods = rendered.of_kind("Pod")
    assert len(pods) == 1
    return pods[0]


def test_helm_test_pod_checks_every_enabled_service(rendered: Rendered) -> None:
    pod = helm_test_pod(rendered)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    expected = [
        f"ledgerlens-{svc}.ledgerlens.svc:{rendered.values['services'][svc]['grpcPort']}"
        for svc in rendered.enabled
    ]
    assert container["args"] == expected
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


async def _health_server(status: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", status)
    return server, port


@pytest.mark.integration
async def test_helm_test_script_passes_serving_and_fails_otherwise(
    renders: dict[str, Rendered],
) -> None:
    command = helm_test_pod(renders["dev"])["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    serving, ok_port = await _health_server(health_pb2.HealthCheckResponse.SERVING)
    failing, bad_port = await _health_server(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:

        def run(*addresses: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", command[2], *addresses],
                capture_output=True,
                text=True,
                timeout=60,
            )

        good = await asyncio.to_thread(run, f"127.0.0.1:{ok_port}")
        assert good.returncode == 0, good.stdout + good.stderr
        assert "SERVING" in good.stdout
        bad = await asyncio.to_thread(run, f"127.0.0.1:{ok_port}", f"127.0.0.1:{bad_port}")
        assert bad.returncode == 1
        assert "NOT_SERVING" in bad.stdout
    finally:
        await serving.stop(None)
        await failing.stop(None)


def test_render_is_deterministic() -> None:
    assert render() == render()

"""The OpenTelemetry Collector config and the kind cluster config."""

from __future__ import annotations

from typing import Any

import yaml
from _promql import INFRA


def _load(path: str) -> Any:
    return yaml.safe_load((INFRA / path).read_text(encoding="utf-8"))


def test_collector_pipelines_are_wired() -> None:
    config = _load("otel/collector.yaml")
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in pipelines.items():
        processors = pipeline["processors"]
        assert processors[0] == "memory_limiter", f"{name}: memory_limiter must come first"
        assert processors[-1] == "batch", f"{name}: batch must come last"
        for kind in used:
            for component in pipeline[kind]:
                assert component in config[kind], f"{name}: {component} is not defined"
                used[kind].add(component)
    for kind, names in used.items():
        assert set(config[kind]) == names, f"{kind} defined but unused: {set(config[kind]) - names}"
    assert set(config["service"]["extensions"]) == set(config["extensions"])


def test_collector_exports_traces_to_the_endpoint_from_env() -> None:
    config = _load("otel/collector.yaml")
    [exporter] = config["service"]["pipelines"]["traces"]["exporters"]
    assert exporter.startswith("otlp")
    assert config["exporters"][exporter]["endpoint"] == "${env:OTEL_TRACES_ENDPOINT}"
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_kind_cluster_has_one_control_plane_and_two_workers() -> None:
    config = _load("kind/kind-config.yaml")
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    roles = [node["role"] for node in config["nodes"]]
    assert roles == ["control-plane", "worker", "worker"]
    mappings = config["nodes"][0]["extraPortMappings"]
    assert {m["containerPort"] for m in mappings} >= {80, 443}

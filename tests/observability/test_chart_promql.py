"""The PromQL of the RENDERED Helm chart (PrometheusRules, the HPA's metric, the Argo
Rollouts AnalysisTemplates, KEDA ScaledObjects, the prometheus-adapter rules) parses, and
queries only what the running services expose (conftest.py), with the labels the chart's
ServiceMonitors give the series."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import pytest
import yaml
from _promql import (
    Query,
    adapter_metric_names,
    adapter_queries,
    load_rule_files,
    recorded_names,
    reference_problems,
)
from _stack import GRPC_SERVICES, Exposition

_helm = pytest.importorskip("_helm", reason="tests/chart/_helm.py (the chart tests) is missing")

pytestmark = pytest.mark.integration

#: what Argo Rollouts puts in for {{args.*}} (the canary's pod-template hash, ...)
ARGO_ARG = re.compile(r"\{\{\s*args\.([\w-]+)\s*\}\}")


def _everything_on(provider: str) -> dict[str, Any]:
    values: dict[str, Any] = {"global.autoscaling.provider": provider}
    for svc in GRPC_SERVICES:
        values[f"services.{svc}.autoscaling.enabled"] = True
        values[f"services.{svc}.canary.enabled"] = True
    return values


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    """The production values with every PromQL-bearing object on: HPA + canary, and KEDA
    + canary."""
    objects: list[dict[str, Any]] = []
    for provider in ("hpa", "keda"):
        objects += _helm.render([_helm.VALUES_PROD], _everything_on(provider))
    return tuple(objects)


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in rendered() if o.get("kind") == kind]


def chart_queries() -> list[Query]:
    found: list[Query] = []
    for obj in of_kind("PrometheusRule"):
        for group in obj["spec"]["groups"]:
            for rule in group["rules"]:
                label = rule.get("record") or rule.get("alert")
                found.append(Query(f"PrometheusRule {label}", rule["expr"], rule["expr"]))
    for obj in of_kind("AnalysisTemplate") + of_kind("ClusterAnalysisTemplate"):
        for metric in obj["spec"]["metrics"]:
            query = metric["provider"]["prometheus"]["query"]
            source = f"AnalysisTemplate {obj['metadata']['name']} {metric['name']}"
            found.append(Query(source, query, ARGO_ARG.sub("0123abcd", query)))
    for obj in of_kind("ScaledObject"):
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                query = trigger["metadata"]["query"]
                found.append(Query(f"ScaledObject {obj['metadata']['name']}", query, query))
    for config in adapter_configs():
        found += adapter_queries(config)
    return found


def adapter_configs() -> list[dict[str, Any]]:
    return [
        yaml.safe_load(obj["data"]["config.yaml"])
        for obj in of_kind("ConfigMap")
        if "prometheus-adapter" in obj["metadata"]["name"] and "config.yaml" in obj["data"]
    ]


def pod_target_labels() -> set[str]:
    """Pod labels the ServiceMonitors copy onto every series (sanitised as Prometheus does)."""
    return {
        re.sub(r"[^a-zA-Z0-9_]", "_", label)
        for monitor in of_kind("ServiceMonitor")
        for label in monitor["spec"].get("podTargetLabels", [])
    }


def test_the_chart_renders_every_kind_of_query() -> None:
    kinds = {o["kind"] for o in rendered()}
    assert {"PrometheusRule", "HorizontalPodAutoscaler", "AnalysisTemplate", "ScaledObject"} <= (
        kinds
    )
    assert adapter_configs(), "no prometheus-adapter rules ConfigMap rendered"


def test_chart_queries_parse() -> None:
    queries = chart_queries()
    assert len(queries) > 30
    failures = []
    for query in queries:
        try:
            query.parse()
        except ValueError as exc:
            failures.append(f"{query.source}: {exc}: {query.promql}")
    assert not failures, "\n".join(failures)


def test_chart_queries_reference_exposed_metrics(exposition: Exposition) -> None:
    problems = reference_problems(
        chart_queries(),
        exposition.labels,
        exposition.values,
        recorded_names(),
        extra_target_labels=pod_target_labels(),
    )
    assert not problems, "\n".join(problems)


def test_prometheus_rules_are_the_infra_rule_files() -> None:
    """The chart installs infra/prometheus/rules as they are (one PrometheusRule each)."""
    specs = [obj["spec"] for obj in of_kind("PrometheusRule")]
    infra = list(load_rule_files().values())
    assert all(spec in specs for spec in infra)
    assert all(spec in infra for spec in specs)


def test_hpas_scale_on_a_metric_the_adapter_serves() -> None:
    served = adapter_metric_names().union(
        *(adapter_metric_names(config) for config in adapter_configs())
    )
    hpas = of_kind("HorizontalPodAutoscaler")
    assert hpas
    for hpa in hpas:
        if hpa["metadata"].get("ownerReferences"):  # made by KEDA, not by the chart
            continue
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] in ("Pods", "Object", "External"):
                key = metric["type"].lower()
                name = metric[key]["metric"]["name"]
                assert name in served, f"{hpa['metadata']['name']}: {name} is not served"


def test_service_monitors_keep_the_service_label() -> None:
    """Without honorLabels the scrape's own `service` target label wins and the metric's
    becomes `exported_service`: every query here would match nothing."""
    monitors = of_kind("ServiceMonitor")
    assert monitors
    for monitor in monitors:
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint.get("honorLabels") is True, monitor["metadata"]["name"]
            assert endpoint.get("path", "/metrics") == "/metrics"

"""The chart renders, lints clean, and every object is valid Kubernetes (or CRD) YAML."""

from __future__ import annotations

import copy
import functools
import tarfile
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from _helm import (
    CHART_DIR,
    LIBRARY_DIR,
    VALUES_DEV,
    VALUES_PROD,
    RenderError,
    lint,
    notes,
    render,
)
from _renders import Rendered

CRD_DIR = Path(__file__).parent / "crds"
REPO = CHART_DIR.parents[1]
#: Kubernetes versions every built-in object must validate against
KUBE_VERSIONS = ("1.30", kubernetes_validate.latest_version())


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema, made strict (see _strict)."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _strict(schema: Any) -> Any:
    """Refuse fields a CRD does not declare (the API server would silently prune them),
    as kubectl's strict field validation does."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_errors(obj: dict[str, Any]) -> list[str]:
    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}"
        for e in validator.iter_errors(obj)
    ]


@pytest.mark.parametrize("files", [[], [VALUES_DEV], [VALUES_PROD]], ids=["default", "dev", "prod"])
@pytest.mark.parametrize("kube_version", [None, "v1.30.0"])
def test_helm_lint_strict_is_clean(files: list[Path], kube_version: str | None) -> None:
    report = lint(files, strict=True, kube_version=kube_version)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], report


def test_lint_reports_bad_values() -> None:
    report = lint(set_values={"services.identity.replicas": -3})
    assert any("minimum" in error for error in report["errors"]), report


def test_builtin_objects_validate_against_kubernetes(rendered: Rendered) -> None:
    custom = {kind for _, kind in crd_schemas()}
    checked = 0
    for obj in rendered.objects:
        if obj["kind"] in custom:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}) {path}: {exc}")
        checked += 1
    assert checked >= 5 * len(rendered.enabled)


def test_kubernetes_validation_catches_a_bad_object(renders: dict[str, Rendered]) -> None:
    deployment = copy.deepcopy(renders["dev"].workload("identity"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


def test_custom_resources_validate_against_crd_schemas(rendered: Rendered) -> None:
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in crd_schemas():
            assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"
        else:
            assert "." not in obj["apiVersion"].split("/")[0] or obj["apiVersion"] in {
                "apps/v1",
                "policy/v1",
                "networking.k8s.io/v1",
                "autoscaling/v2",
            }, f"no schema for {obj['apiVersion']} {obj['kind']}"


def test_every_custom_resource_kind_is_rendered_and_checked(
    renders: dict[str, Rendered],
) -> None:
    kinds = {
        o["kind"]
        for name in ("prod", "prod-keda")
        for o in renders[name].objects
        if (o["apiVersion"], o["kind"]) in crd_schemas()
    }
    assert kinds == {
        "Rollout",
        "AnalysisTemplate",
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
    }


def test_crd_validation_catches_unknown_and_mistyped_fields(renders: dict[str, Rendered]) -> None:
    rollout = copy.deepcopy(renders["prod"].workload("ingestion"))
    rollout["spec"]["strategy"]["canary"]["stepz"] = []
    assert any("stepz" in e for e in crd_errors(rollout))
    monitor = copy.deepcopy(renders["prod"].get("ServiceMonitor", "ledgerlens-ingestion"))
    monitor["spec"]["endpoints"][0]["honorLabels"] = "yes"
    assert crd_errors(monitor)


def test_vendored_crds_have_provenance() -> None:
    readme = (CRD_DIR / "README.md").read_text()
    for path in CRD_DIR.glob("*.yaml"):
        assert path.name in readme, f"{path.name} is not described in crds/README.md"
    for word in ("Apache-2.0", "argoproj/argo-rollouts", "prometheus-operator", "kedacore/keda"):
        assert word in readme


SCHEMA = "values don't meet the specifications of the schema"


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        ({"services.retrieval.replicas": -1}, "at '/services/retrieval/replicas': minimum"),
        (
            {"services.retrieval.backend": "faiss"},
            "at '/services/retrieval/backend': value must be one of 'local', 'qdrant'",
        ),
        (
            {"services.ledger.backend": "ethereum"},
            "at '/services/ledger/backend': value must be one of 'dev', 'fabric'",
        ),
        (
            {"global.autoscaling.provider": "vpa"},
            "at '/global/autoscaling/provider': value must be one of 'hpa', 'keda'",
        ),
        (
            {"services.ingestion.autoscaling.provider": "vpa"},
            "at '/services/ingestion/autoscaling/provider': value must be one of 'hpa', 'keda'",
        ),
        (
            {"services.identity.env": {"LEDGERLENS_LEDGER_BACKEND": "dev"}},
            "'LEDGERLENS_LEDGER_BACKEND' does not match pattern '^LEDGERLENS_IDENTITY_",
        ),
        ({"services.billing": {"enabled": True}}, "additional properties 'billing' not allowed"),
    ],
    ids=[
        "replicas",
        "retrieval-backend",
        "ledger-backend",
        "provider",
        "svc-provider",
        "env",
        "svc",
    ],
)
def test_bad_values_fail_at_render_with_a_schema_message(
    set_values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError) as caught:
        render(set_values=set_values)
    assert SCHEMA in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        (
            {"services.retrieval.replicas": 2},
            "services.retrieval runs more than one replica: set externalPostgresql.enabled",
        ),
        (
            {"services.retrieval.backend": "qdrant"},
            "services.retrieval.backend is qdrant: set externalQdrant.url",
        ),
        (
            {"externalPostgresql.enabled": True, "services.identity.replicas": 3},
            "services.identity runs more than one replica: every replica needs the same key",
        ),
        (
            {"services.ledger.backend": "fabric"},
            "set services.ledger.env.LEDGERLENS_LEDGER_FABRIC__PEER_ADDRESS",
        ),
    ],
    ids=["sqlite-replicas", "qdrant-url", "identity-kek", "fabric-peer"],
)
def test_unworkable_combinations_fail_with_the_reason(
    set_values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError, match=message.replace(".", r"\.")):
        render(set_values=set_values)


def test_notes_name_every_enabled_service() -> None:
    text = notes([VALUES_PROD])
    for svc in ("identity", "ingestion", "retrieval", "inference", "ledger"):
        assert f"ledgerlens-{svc}.ledgerlens.svc:" in text
    # prod's inference reads its credentials from existingSecret; dev has none yet
    assert "no service credentials" not in text
    dev = notes([VALUES_DEV])
    assert "no service credentials" in dev
    assert "LEDGERLENS_INFERENCE_SERVICE_CLIENT_SECRET" in dev
    given = notes(
        [VALUES_DEV],
        {
            "services.inference.secretEnv.LEDGERLENS_INFERENCE_SERVICE_CLIENT_ID": "llk_x",
            "services.inference.secretEnv.LEDGERLENS_INFERENCE_SERVICE_CLIENT_SECRET": "lls_x",
        },
    )
    assert "no service credentials" not in given
    assert "helm test ledgerlens" in text


def test_chart_packages_with_library_dashboards_and_rules(tmp_path: Path) -> None:
    """The symlinks (library chart, infra/ dashboards and rules) resolve into the package,
    and the dependency needs no repository (nothing to download)."""
    assert helm.dependency_list(CHART_DIR) == [
        {"name": "ledgerlens-service", "version": "0.1.0", "repository": "", "status": "unpacked"}
    ]
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "ledgerlens/charts/ledgerlens-service/templates/_workload.tpl" in names
    for path in (REPO / "infra/grafana/dashboards").glob("*.json"):
        assert f"ledgerlens/files/dashboards/{path.name}" in names
    for path in (REPO / "infra/prometheus/rules").glob("*.yaml"):
        assert f"ledgerlens/files/rules/{path.name}" in names


def test_library_chart_lints_clean() -> None:
    report = helm.lint(LIBRARY_DIR, strict=True)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report

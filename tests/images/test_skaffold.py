"""skaffold.yaml against the services, their Dockerfiles and the chart's value keys."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from _repo import REPO, default_ports, services_with_main

SERVICES = services_with_main()


def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    return loaded


def artifacts() -> dict[str, dict[str, Any]]:
    return {a["image"]: a for a in config()["build"]["artifacts"]}


def release(cfg: dict[str, Any]) -> dict[str, Any]:
    [only] = cfg["deploy"]["helm"]["releases"]
    return only


def profile(name: str) -> dict[str, Any]:
    [found] = [p for p in config()["profiles"] if p["name"] == name]
    return found


def apply(cfg: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON patches (add/replace) a profile makes, as skaffold applies them."""
    out = copy.deepcopy(cfg)
    for patch in patches:
        *parents, last = patch["path"].strip("/").split("/")
        node: Any = out
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if patch["op"] == "add" and last == "-":
            node.append(patch["value"])
        elif patch["op"] in ("add", "replace"):
            if patch["op"] == "replace":
                assert last in node, patch
            node[last] = patch["value"]
        else:
            raise AssertionError(f"unexpected patch {patch}")
    return out


def test_schema_version() -> None:
    cfg = config()
    assert cfg["apiVersion"] == "skaffold/v4beta11"
    assert cfg["kind"] == "Config"


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_is_built(service: str) -> None:
    artifact = artifacts()[f"ledgerlens/{service}"]
    assert artifact["context"] == "."
    assert artifact["docker"]["dockerfile"] == f"services/{service}/Dockerfile"


@pytest.mark.parametrize("image", sorted(artifacts()))
def test_artifacts_point_at_existing_dockerfiles(image: str) -> None:
    artifact = artifacts()[image]
    context = REPO / artifact["context"]
    assert context.is_dir()
    assert (context / artifact["docker"]["dockerfile"]).is_file()
    assert (context / ".dockerignore").is_file()


@pytest.mark.parametrize("service", SERVICES)
def test_built_image_reaches_the_chart_values(service: str) -> None:
    templates = release(config())["setValueTemplates"]
    key = f"ledgerlens_{service}"  # skaffold's template name: '/' becomes '_'
    assert templates[f"services.{service}.image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
    assert templates[f"services.{service}.image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}"


def test_every_value_template_names_a_built_image() -> None:
    names = {image.replace("/", "_").replace("-", "_") for image in artifacts()}
    for value in release(config())["setValueTemplates"].values():
        assert value.split("_", 2)[2].rstrip("}") in names, value


def test_helm_release_uses_the_umbrella_chart() -> None:
    rel = release(config())
    assert (REPO / rel["chartPath"] / "Chart.yaml").is_file()
    assert rel["valuesFiles"] == ["charts/ledgerlens/values.yaml"]


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_profile_adds_its_values_file(name: str) -> None:
    applied = apply(config(), profile(name)["patches"])
    assert release(applied)["valuesFiles"] == [
        "charts/ledgerlens/values.yaml",
        f"charts/ledgerlens/values-{name}.yaml",
    ]


def test_prod_pushes_and_dev_does_not() -> None:
    assert apply(config(), profile("dev")["patches"])["build"]["local"]["push"] is False
    assert apply(config(), profile("prod")["patches"])["build"]["local"]["push"] is True


def test_dev_forwards_every_grpc_port() -> None:
    """Each forward names a Service the dev profile really renders, on its gRPC port."""
    from _helm import RELEASE, VALUES_DEV, render

    assert release(config())["name"] == RELEASE
    rendered = {
        o["metadata"]["name"]: {p["port"] for p in o["spec"]["ports"]}
        for o in render([VALUES_DEV])
        if o["kind"] == "Service"
    }
    forwards = {(f["resourceName"], f["port"]) for f in profile("dev")["portForward"]}
    for name, port in forwards:
        assert port in rendered.get(name, set()), f"{name}:{port} is not a rendered Service port"
    for service in SERVICES:
        assert (f"{RELEASE}-{service}", default_ports(service)[0]) in forwards

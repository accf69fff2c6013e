"""Render and lint the umbrella chart offline, with real Helm (v4, via helm-python-sdk).

``render()`` is what every chart test (and other test suites) builds on::

    from _helm import render
    objects = render([VALUES_PROD], {"services": {"inference": {"replicas": 3}}})

Values files are merged the way ``helm -f a.yaml -f b.yaml --set ...`` merges them: maps
merge key by key, anything else is replaced, and a ``null`` removes the key. Helm then
coalesces the result with the chart's ``values.yaml`` and validates it against
``values.schema.json`` before rendering, so bad values raise :class:`RenderError`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

__all__ = [
    "CHART_DIR",
    "LIBRARY_DIR",
    "NAMESPACE",
    "RELEASE",
    "VALUES_DEV",
    "VALUES_PROD",
    "RenderError",
    "lint",
    "merge_values",
    "notes",
    "render",
    "values",
]

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "ledgerlens"
LIBRARY_DIR = REPO / "charts" / "ledgerlens-service"
VALUES_DEV = CHART_DIR / "values-dev.yaml"
VALUES_PROD = CHART_DIR / "values-prod.yaml"
RELEASE = "ledgerlens"
NAMESPACE = "ledgerlens"

#: what a failed render or a value the schema refuses raises (message from Helm)
RenderError = helm.HelmError


@functools.cache
def _chart() -> helm.Chart:
    # loaded once per process: the chart files do not change during a test session
    return helm.Chart.load(CHART_DIR)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _expand_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the ``--set`` spelling), nested dicts as is."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        parts = key.split(".")
        leaf: dict[str, Any] = {}
        node = leaf
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _merge(out, leaf)
    return out


def merge_values(
    values_files: Iterable[Path] = (), set_values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The user-supplied values: the files in order, then ``set_values`` on top."""
    merged: dict[str, Any] = {}
    for path in values_files:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        _merge(merged, loaded)
    if set_values:
        _merge(merged, _expand_dotted(set_values))
    return merged


def _manifests(
    values_files: Iterable[Path], set_values: Mapping[str, Any] | None
) -> dict[str, str]:
    return _chart().render(
        merge_values(values_files, set_values),
        name=RELEASE,
        namespace=NAMESPACE,
        is_install=True,
    )


def render(
    values_files: Iterable[Path] = (), set_values: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every object the chart renders (YAML-parsed, empty documents dropped).

    Raises :data:`RenderError` when the values break the schema or a template fails.
    """
    objects: list[dict[str, Any]] = []
    for name, text in sorted(_manifests(values_files, set_values).items()):
        if name.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def values(
    values_files: Iterable[Path] = (), set_values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The values a release would use: the chart's defaults coalesced with these."""
    return _chart().merge_values(merge_values(values_files, set_values))


def notes(values_files: Iterable[Path] = (), set_values: dict[str, Any] | None = None) -> str:
    """The rendered NOTES.txt."""
    manifests = _manifests(values_files, set_values)
    return next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))


def lint(
    values_files: Iterable[Path] = (),
    set_values: dict[str, Any] | None = None,
    *,
    strict: bool = True,
    kube_version: str | None = None,
) -> dict[str, Any]:
    """``helm lint [--strict]`` of the umbrella chart with these values.

    Returns Helm's report: ``{"messages": [{"severity", "path", "error"}], "errors": [...]}``
    (severity 1 info, 2 warning, 3 error).
    """
    return helm.lint(
        CHART_DIR,
        merge_values(values_files, set_values),
        strict=strict,
        namespace=NAMESPACE,
        kube_version=kube_version,
    )

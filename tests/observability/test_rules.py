"""The Prometheus rule files and the prometheus-adapter rules: their shape, and the
SLO burn-rate alerts' windows and thresholds."""

from __future__ import annotations

import re

import pytest
from _promql import (
    INFRA,
    adapter_metric_names,
    iter_rules,
    load_adapter_rules,
    load_rule_files,
    recorded_names,
    rule_queries,
    selectors,
)

SEVERITIES = {"critical", "warning", "info"}
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
DURATION = re.compile(r"^\d+[smhd]$")
#: (long window, short window, burn-rate factor, severity) of the multi-window alerts
BURN_WINDOWS = {
    ("1h", "5m", 14.4, "critical"),
    ("6h", "30m", 6.0, "critical"),
    ("1d", "2h", 3.0, "warning"),
}
BUDGETS = {"availability": 0.001, "latency": 0.01}


def _readme_anchors() -> set[str]:
    anchors = set()
    for line in (INFRA / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_each_file_is_a_prometheusrule_spec() -> None:
    files = load_rule_files()
    assert len(files) >= 3
    groups = []
    for name, spec in files.items():
        assert set(spec) == {"groups"}, f"{name}: top level must be only `groups`"
        for group in spec["groups"]:
            assert set(group) <= {"name", "interval", "rules", "limit"}, name
            assert group["rules"], f"{name}: {group['name']} is empty"
            groups.append(group["name"])
    assert len(groups) == len(set(groups)), "group names must be unique across files"


def test_every_rule_is_complete() -> None:
    anchors = _readme_anchors()
    names = []
    for where, rule in iter_rules(load_rule_files()):
        assert ("record" in rule) != ("alert" in rule), where
        if "record" in rule:
            assert RECORD_NAME.match(rule["record"]), rule["record"]
            assert set(rule) <= {"record", "expr", "labels"}, where
            continue
        alert = rule["alert"]
        names.append(alert)
        assert rule["labels"]["severity"] in SEVERITIES, alert
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), alert
        url = annotations["runbook_url"]
        assert url.startswith("https://"), alert
        anchor = url.partition("#")[2]
        assert anchor == alert.lower(), f"{alert}: runbook anchor {anchor}"
        assert anchor in anchors, f"{alert}: infra/README.md has no section {alert}"
        if "for" in rule:
            assert DURATION.match(rule["for"]), alert
    assert len(names) == len(set(names))


def test_recorded_names_are_defined_once_and_used() -> None:
    records = [r["record"] for _, r in iter_rules(load_rule_files()) if "record" in r]
    assert len(records) == len(set(records))
    used = {s.name for q in rule_queries() for s in selectors(q.parse())}
    # every SLO window is read by an alert; the 5m ones also by dashboards and canaries
    slo = {r for r in records if ":ratio_rate" in r and ("faults" in r or "slow" in r)}
    assert slo <= used, sorted(slo - used)


def _slo_alerts() -> list[dict]:
    return [
        rule
        for _, rule in iter_rules(load_rule_files())
        if "alert" in rule and "slo" in rule.get("labels", {})
    ]


def test_burn_rate_alerts_pair_a_long_and_a_short_window() -> None:
    seen = set()
    pattern = re.compile(
        r"^service:ledgerlens_rpc_server_(\w+):ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\)\s*"
        r"and on \(service\)\s*"
        r"service:ledgerlens_rpc_server_(\w+):ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\)\s*$"
    )
    for rule in _slo_alerts():
        match = pattern.match(rule["expr"].strip())
        assert match, rule["alert"]
        kind, long, factor, budget, kind2, short, factor2, budget2 = match.groups()
        slo = rule["labels"]["slo"]
        assert kind == kind2 == {"availability": "faults", "latency": "slow"}[slo]
        assert (factor, budget) == (factor2, budget2), rule["alert"]
        assert float(budget) == BUDGETS[slo], rule["alert"]
        window = (long, short, float(factor), rule["labels"]["severity"])
        assert window in BURN_WINDOWS, (rule["alert"], window)
        assert rule["labels"]["window"] == long
        seen.add((slo, window))
    assert seen == {(slo, w) for slo in BUDGETS for w in BURN_WINDOWS}
    assert recorded_names() >= {
        f"service:ledgerlens_rpc_server_{k}:ratio_rate{w}"
        for k in ("faults", "slow")
        for w in ("5m", "30m", "1h", "2h", "6h", "1d")
    }


def test_latency_slo_reads_the_bucket_of_its_threshold() -> None:
    """le must be written as the runtime writes it ("0.5"), or the selector is empty."""
    for where, rule in iter_rules(load_rule_files()):
        if rule.get("record", "").startswith("service:ledgerlens_rpc_server_slow:"):
            assert 'le="0.5"' in rule["expr"], where
            assert 'method!~".*Stream.*"' in rule["expr"], where


def test_adapter_exposes_the_p95_pods_metric() -> None:
    config = load_adapter_rules()
    assert set(config) <= {"rules", "externalRules", "resourceRules"}
    [rule] = config["rules"]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert adapter_metric_names() == {"ledgerlens_rpc_server_p95_seconds"}
    query = rule["metricsQuery"]
    for marker in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert marker in query
    assert query.startswith("histogram_quantile(0.95,")
    assert 'service=~"ledgerlens[.].+"' in query  # no health checks in the p95


@pytest.mark.parametrize("name", sorted(load_rule_files()))
def test_rule_file_names(name: str) -> None:
    assert name.startswith("ledgerlens-")
    assert name.endswith(".yaml")

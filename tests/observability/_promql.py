"""Every PromQL expression the infra/ files hold, and what they reference.

Imported by name by the observability tests (and the chart test): the expressions are
read from the files, template variables substituted with representative values, parsed
with a real PromQL parser (PyPI ``promql-parser``), and their vector selectors walked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DASHBOARDS = INFRA / "grafana" / "dashboards"
RULES = INFRA / "prometheus" / "rules"
ADAPTER_RULES = INFRA / "prometheus" / "adapter-rules.yaml"

#: Representative values of the dashboards' template variables. A variable missing here
#: fails the substitution, so a new one must be given a value to be tested.
GRAFANA_VALUES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "6h",
    "datasource": "prometheus",
    "service": "ledgerlens.ingestion.v1.IngestionService",
    "subject": "ledgerlens.ingestion.chunks.embedded.v1",
}
#: What prometheus-adapter puts in for its template markers (a Pods metric of one pod).
ADAPTER_VALUES = {
    "LabelMatchers": 'namespace="ledgerlens",pod="ledgerlens-ingestion-0"',
    "GroupBy": "namespace,pod",
}

_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_ADAPTER_VAR = re.compile(r"<<\s*\.(\w+)\s*>>")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Query:
    """One expression: where it is, as written, and as parsed (after substitution)."""

    source: str
    text: str
    promql: str

    def parse(self) -> Any:
        return promql_parser.parse(self.promql)


@dataclass(frozen=True)
class Selector:
    """A vector selector: its metric name and its label matchers ``(label, op, value)``."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]


def substitute_grafana(text: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VALUES:
            raise KeyError(f"no representative value for Grafana variable ${name}")
        return GRAFANA_VALUES[name]

    return _GRAFANA_VAR.sub(value, text)


def substitute_adapter(text: str, series: str) -> str:
    values = {**ADAPTER_VALUES, "Series": series}

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise KeyError(f"unknown prometheus-adapter template marker {match.group(0)}")
        return values[match.group(1)]

    return _ADAPTER_VAR.sub(value, text)


# -- the files -------------------------------------------------------------------------


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS.glob("*.json"))
    }


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries() -> list[Query]:
    found: list[Query] = []
    for name, board in load_dashboards().items():
        for panel in iter_panels(board.get("panels", [])):
            for t in panel.get("targets", []):
                source = f"{name}: {panel.get('title')!r} {t.get('refId')}"
                found.append(Query(source, t["expr"], substitute_grafana(t["expr"])))
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            if match is None:
                raise ValueError(f"{name}: variable {var['name']}: not label_values(): {query}")
            selector = match.group(1) or "{}"
            source = f"{name}: variable ${var['name']}"
            found.append(Query(source, selector, substitute_grafana(selector)))
    return found


def load_rule_files() -> dict[str, dict[str, Any]]:
    return {
        p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(RULES.glob("*.yaml"))
    }


def iter_rules(files: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, spec in files.items():
        for group in spec["groups"]:
            for rule in group["rules"]:
                yield f"{name}: {group['name']}", rule


def rule_queries(files: dict[str, dict[str, Any]] | None = None) -> list[Query]:
    found = []
    for where, rule in iter_rules(files if files is not None else load_rule_files()):
        label = rule.get("record") or rule.get("alert")
        found.append(Query(f"{where}: {label}", rule["expr"], rule["expr"]))
    return found


def recorded_names(files: dict[str, dict[str, Any]] | None = None) -> set[str]:
    return {
        rule["record"]
        for _, rule in iter_rules(files if files is not None else load_rule_files())
        if "record" in rule
    }


def load_adapter_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ADAPTER_RULES.read_text(encoding="utf-8"))
    return loaded


def adapter_queries(config: dict[str, Any] | None = None) -> list[Query]:
    config = config if config is not None else load_adapter_rules()
    found = []
    for kind in ("rules", "externalRules", "resourceRules"):
        for i, rule in enumerate(config.get(kind) or []):
            if kind == "resourceRules":  # {cpu: {...}, memory: {...}}
                continue
            series_query = rule["seriesQuery"]
            where = f"adapter-rules.yaml: {kind}[{i}]"
            found.append(Query(f"{where} seriesQuery", series_query, series_query))
            [series] = {s.name for s in selectors(promql_parser.parse(series_query))}
            found.append(
                Query(
                    f"{where} metricsQuery",
                    rule["metricsQuery"],
                    substitute_adapter(rule["metricsQuery"], series),
                )
            )
    return found


def adapter_metric_names(config: dict[str, Any] | None = None) -> set[str]:
    """The names the adapter serves (``name.as``) to HPAs."""
    config = config if config is not None else load_adapter_rules()
    return {
        rule["name"]["as"] for kind in ("rules", "externalRules") for rule in config.get(kind) or []
    }


def all_infra_queries() -> list[Query]:
    return dashboard_queries() + rule_queries() + adapter_queries()


# -- the AST ---------------------------------------------------------------------------


_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


def _op(op: Any) -> str:
    """``MatchOp.NotRe`` -> ``!~``."""
    return _OPS[str(op).rpartition(".")[2]]


def selectors(expr: Any) -> list[Selector]:
    """Every vector selector in ``expr`` (those inside range vectors and subqueries too)."""
    found: list[Selector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = tuple(
                (m.name, _op(m.op), m.value) for m in node.matchers.matchers if m.name != "__name__"
            )
            name = node.name or next(
                (m.value for m in node.matchers.matchers if m.name == "__name__"), ""
            )
            found.append(Selector(name, matchers))

    promql_parser.walk(expr, pre_visit=visit)
    return found


def histogram_family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- what the expressions reference vs what the services expose -----------------------

#: Labels a scrape adds to every series (the ServiceMonitor's target labels): queries may
#: match on them though no /metrics shows them.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})

#: Metric prefixes of services that do not run yet, allowed ahead of them (with why).
#: Empty: every service runs.
PENDING_SERVICES: dict[str, str] = {}


def reference_problems(
    queries: Iterable[Query],
    labels: dict[str, set[str]],
    values: dict[tuple[str, str], set[str]],
    recorded: set[str],
    extra_target_labels: Iterable[str] = (),
) -> list[str]:
    """What the queries reference that the scraped metrics do not have.

    ``labels``: sample name -> label names exposed; ``values``: (sample, label) -> values.
    A metric name must be exposed (histograms by their ``_bucket``/``_sum``/``_count``
    samples) or recorded by a rule; the labels a selector matches on must
    exist on it (or be target labels); a ``service`` or ``le`` it matches with ``=`` or
    ``=~`` must match a value the services exposed.
    """
    problems: list[str] = []
    target_labels = TARGET_LABELS | set(extra_target_labels)
    for query in queries:
        for sel in selectors(query.parse()):
            name = sel.name
            if name in recorded:
                continue
            if any(name.startswith(prefix) for prefix in PENDING_SERVICES):
                continue
            if name not in labels:
                family = histogram_family(name)
                siblings = sorted(n for n in labels if n.startswith(family))
                hint = f" (family {family} exposes {siblings})" if family != name else ""
                problems.append(f"{query.source}: {name} is not exposed by any service{hint}")
                continue
            for label, op, value in sel.matchers:
                if label not in labels[name] and label not in target_labels:
                    problems.append(
                        f"{query.source}: {name} has no label {label!r} "
                        f"(has {sorted(labels[name])})"
                    )
                    continue
                if label not in ("service", "le") or op in ("!=", "!~"):
                    continue
                seen = values.get((name, label), set())
                if op == "=":
                    ok = value in seen
                else:
                    pattern = re.compile(value)
                    ok = any(pattern.fullmatch(v) for v in seen)
                if not ok:
                    problems.append(
                        f"{query.source}: {name}{{{label}{op}{value!r}}} matches none of "
                        f"{sorted(seen)}"
                    )
    return problems

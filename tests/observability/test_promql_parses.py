"""Every PromQL expression in infra/ parses with a real PromQL parser, after the
dashboards' and prometheus-adapter's template variables are substituted."""

from __future__ import annotations

import pytest
from _promql import (
    Query,
    adapter_queries,
    all_infra_queries,
    dashboard_queries,
    iter_panels,
    load_dashboards,
    load_rule_files,
    rule_queries,
    substitute_adapter,
    substitute_grafana,
)

QUERIES = all_infra_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[q.source for q in QUERIES])
def test_query_parses(query: Query) -> None:
    assert "$" not in query.promql, query.promql
    assert "<<" not in query.promql, query.promql
    query.parse()  # raises ValueError with the parser's message


def test_every_expression_is_collected() -> None:
    """Extraction finds a query for every target and rule, so none escapes parsing."""
    targets = sum(
        len(p.get("targets", []))
        for board in load_dashboards().values()
        for p in iter_panels(board["panels"])
    )
    variables = sum(
        v["type"] == "query"
        for board in load_dashboards().values()
        for v in board["templating"]["list"]
    )
    assert targets > 40
    assert len(dashboard_queries()) == targets + variables
    rules = sum(len(g["rules"]) for f in load_rule_files().values() for g in f["groups"])
    assert len(rule_queries()) == rules > 20
    assert len(adapter_queries()) == 2  # seriesQuery + metricsQuery of the p95 rule


def test_the_parser_rejects_broken_promql() -> None:
    with pytest.raises(ValueError, match="parenthesis"):
        Query("probe", "", "sum(rate(x[5m])").parse()
    with pytest.raises(ValueError, match="inside brackets"):
        Query("probe", "", 'rate(x{a="b"}[5 m])').parse()


def test_substitution() -> None:
    assert substitute_grafana('rate(x{s=~"$service"}[$__rate_interval])') == (
        'rate(x{s=~"ledgerlens.ingestion.v1.IngestionService"}[5m])'
    )
    assert substitute_grafana("${datasource}") == "prometheus"
    with pytest.raises(KeyError):
        substitute_grafana("rate(x[$unknown])")
    assert substitute_adapter("sum by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})", "x") == (
        'sum by (namespace,pod) (x{namespace="ledgerlens",pod="ledgerlens-ingestion-0"})'
    )
    with pytest.raises(KeyError):
        substitute_adapter("<<.Unknown>>", "x")

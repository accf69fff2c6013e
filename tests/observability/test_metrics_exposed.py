"""Every metric the dashboards, rules and adapter rules query is one the running
services expose on /metrics (see conftest.py for how they run)."""

from __future__ import annotations

import pytest
from _promql import (
    Query,
    all_infra_queries,
    recorded_names,
    reference_problems,
    selectors,
)
from _stack import GRPC_SERVICES, Exposition
from prometheus_client.parser import text_string_to_metric_families

from ledgerlens.services.ingestion.app import ANCHOR_CONSUMER
from ledgerlens.services.ledger.app import LEDGER_CONSUMERS
from ledgerlens.services.retrieval.app import RETRIEVAL_CONSUMERS

pytestmark = pytest.mark.integration

RPC = "ledgerlens_rpc_server_duration_seconds"


def test_every_referenced_metric_and_label_is_exposed(exposition: Exposition) -> None:
    queries = all_infra_queries()
    problems = reference_problems(queries, exposition.labels, exposition.values, recorded_names())
    assert not problems, "\n".join(problems)


def test_every_service_serves_its_rpc_histogram(exposition: Exposition) -> None:
    for svc, grpc_service in GRPC_SERVICES.items():
        assert f'service="{grpc_service}"' in exposition.texts[svc], svc
        assert svc in exposition.exposed_by[f"{RPC}_bucket"], svc
    assert set(GRPC_SERVICES.values()) <= exposition.values[(f"{RPC}_count", "service")]


def test_the_pipeline_really_ran_in_this_stack(exposition: Exposition) -> None:
    """The event metrics carry this run's own subjects: what the check saw was produced by
    the services it started, not left in the registry by another test."""
    names = exposition.names
    assert names is not None
    published = exposition.values[("ledgerlens_events_published_total", "subject")]
    consumed = exposition.values[("ledgerlens_events_consumed_total", "subject")]
    for subject in (
        "ledgerlens.ingestion.document.ingested.v1",
        "ledgerlens.ingestion.chunks.embedded.v1",
        "ledgerlens.ledger.anchor.committed.v1",
    ):
        assert names.subject(subject) in published, subject
        assert names.subject(subject) in consumed, subject
    for name in (
        "ledgerlens_ledger_commit_duration_seconds_bucket",
        "ledgerlens_retrieval_index_lag_seconds_bucket",
        "ledgerlens_event_handle_duration_seconds_bucket",
        "ledgerlens_ledger_anchor_batch_items_bucket",
    ):
        assert name in exposition.labels, name


def test_the_check_reports_what_is_not_exposed(exposition: Exposition) -> None:
    """The check itself can fail: an unknown metric, a label it does not have, a service
    or bucket bound no service exposes."""
    bad = [
        Query("probe", q, q)
        for q in (
            "rate(ledgerlens_nope_total[5m])",
            f'rate({RPC}_count{{tenant="acme"}}[5m])',
            f'rate({RPC}_count{{service="ledgerlens.nope.v1.NopeService"}}[5m])',
            f'rate({RPC}_bucket{{le="1"}}[5m])',
        )
    ]
    problems = reference_problems(bad, exposition.labels, exposition.values, recorded_names())
    assert len(problems) == 4, problems


def test_the_services_expose_their_consumers_jetstream_state(exposition: Exposition) -> None:
    """The consuming services report the JetStream state of their durable consumers (this
    run's, by name) and the size of this run's dead-letter stream. (The services share
    this process's registry, so which /metrics shows them is not what is checked.)"""
    names = exposition.names
    assert names is not None
    durables = {
        names.consumer(spec).durable
        for spec in (*LEDGER_CONSUMERS, *RETRIEVAL_CONSUMERS, ANCHOR_CONSUMER)
    }
    for gauge in (
        "ledgerlens_events_consumer_pending",
        "ledgerlens_events_consumer_ack_pending",
        "ledgerlens_events_consumer_redelivered",
    ):
        assert durables <= exposition.values[(gauge, "consumer")], gauge
    dead_letters = exposition.values[("ledgerlens_events_dead_letter_messages", "stream")]
    assert names.stream_name("DEADLETTER") in dead_letters


def test_the_inference_dashboard_reads_what_the_gateway_recorded(
    exposition: Exposition,
) -> None:
    """Every ``ledgerlens_inference_*`` metric the infra files query is on the inference
    service's /metrics, and the stack's chat really fell back (see _stack.py) and was
    accounted, so those series hold this run's observations, not only zeros."""
    names = {s.name for q in all_infra_queries() for s in selectors(q.parse())}
    inference = {n for n in names if n.startswith("ledgerlens_inference_")}
    assert {
        "ledgerlens_inference_requests_total",
        "ledgerlens_inference_tokens_total",
        "ledgerlens_inference_cost_usd_total",
        "ledgerlens_inference_fallbacks_total",
        "ledgerlens_inference_cache_total",
        "ledgerlens_inference_rate_limited_total",
        "ledgerlens_inference_moderation_refusals_total",
    } <= inference
    for name in inference:
        assert "inference" in exposition.exposed_by[name], name
    fallbacks = parse_samples(exposition.texts["inference"], "ledgerlens_inference_fallbacks_total")
    assert fallbacks.get((("from_provider", "down"), ("to_provider", "local")), 0) >= 1
    chats = parse_samples(exposition.texts["inference"], "ledgerlens_inference_requests_total")
    assert chats[(("outcome", "ok"), ("rpc", "Chat"))] >= 1
    assert ("provider", "local") in {
        label
        for labels in parse_samples(
            exposition.texts["inference"], "ledgerlens_inference_tokens_total"
        )
        for label in labels
    }


def parse_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The values of sample ``name`` in an exposition, by sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }

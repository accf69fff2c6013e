"""Generate the Grafana dashboards in ``dashboards/`` (stdlib only).

    python infra/grafana/build.py           # rewrite dashboards/*.json
    python infra/grafana/build.py --check   # exit 1 when a committed file differs

The dashboards are code so that every one has the same shape: a ``${datasource}``
Prometheus variable, stable uids, one panel builder, the same series filters (only
ledgerlens gRPC services, never the health or reflection services) and the SLO
thresholds of ``infra/prometheus/rules``. ``tests/observability`` fails when a committed
file and this script's output differ, and parses every query against what the running
services expose.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

SCHEMA_VERSION = 39  # Grafana 10.4 / 11
DS = {"type": "prometheus", "uid": "${datasource}"}
#: every RPC of the platform's own services (``ledgerlens.<svc>.v1.<Name>Service``);
#: ``[.]`` instead of ``\\.`` so the regex survives JSON, YAML and PromQL quoting alike
LEDGERLENS_SERVICES = "ledgerlens[.].+"
#: the latency SLO threshold (seconds): a bucket bound of the RPC histogram, and the
#: one the latency burn-rate alerts use (``le="0.5"``)
LATENCY_SLO_SECONDS = 0.5
#: the availability SLO (server faults / all calls)
AVAILABILITY_SLO = 0.999
#: the gRPC codes that count against availability (OpenTelemetry's server-fault codes)
SERVER_FAULT_CODES = "UNKNOWN|DEADLINE_EXCEEDED|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS"

#: the share of refused token requests LedgerlensIdentityTokenFailureSpike alerts on
TOKEN_FAILURE_RATIO = 0.5
RPC = "ledgerlens_rpc_server_duration_seconds"
RATE = "$__rate_interval"


# -- building blocks ---------------------------------------------------------------------


def datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_var(
    name: str, label: str, metric_selector: str, label_name: str, all_value: str
) -> dict[str, Any]:
    query = f"label_values({metric_selector}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "includeAll": True,
        "allValue": all_value,
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "regex": "",
        "skipUrlSync": False,
    }


def service_var() -> dict[str, Any]:
    return query_var(
        "service",
        "gRPC service",
        f'{RPC}_count{{service=~"{LEDGERLENS_SERVICES}"}}',
        "service",
        LEDGERLENS_SERVICES,
    )


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


class Layout:
    """Places panels left to right, 24 columns wide, rows as needed."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, width: int, height: int) -> dict[str, int]:
        if self.x + width > 24:
            self.x = 0
            self.y += self.row_height
            self.row_height = 0
        pos = {"h": height, "w": width, "x": self.x, "y": self.y}
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos

    def row(self, title: str) -> dict[str, Any]:
        if self.x:
            self.x = 0
            self.y += self.row_height
            self.row_height = 0
        panel = {
            "type": "row",
            "title": title,
            "id": self._id(),
            "collapsed": False,
            "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
        }
        self.y += 1
        return panel

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        description: str = "",
        width: int = 12,
        height: int = 8,
        threshold: float | None = None,
        stack: bool = False,
    ) -> dict[str, Any]:
        refs = "ABCDEFGHIJ"
        defaults: dict[str, Any] = {"unit": unit}
        if threshold is not None:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [
                    {"color": "green", "value": None},
                    {"color": "red", "value": threshold},
                ],
            }
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 10 if stack else 0,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"group": "A", "mode": "normal" if stack else "none"},
                "thresholdsStyle": {"mode": "line" if threshold is not None else "off"},
            }
            options: dict[str, Any] = {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:
            options = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
                "textMode": "auto",
            }
        return {
            "type": kind,
            "title": title,
            "description": description,
            "id": self._id(),
            "datasource": DS,
            "gridPos": self.place(width, height),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options,
            "targets": [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(targets)],
        }


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    variables: list[dict[str, Any]],
    tags: list[str],
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["ledgerlens", *tags],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "version": 1,
        "links": [
            {
                "type": "dashboards",
                "tags": ["ledgerlens"],
                "asDropdown": True,
                "title": "ledgerlens",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "annotations": {"list": []},
        "templating": {"list": [datasource_var(), *variables]},
        "panels": panels,
    }


# -- RPC (RED) panels, shared by the overview and the per-service dashboards --------------


def rpc_panels(layout: Layout, sel: str, by: str, legend: str) -> list[dict[str, Any]]:
    """Rate, errors and p95 of the RPCs matching ``sel``, split ``by`` labels."""
    count = f"{RPC}_count{{{sel}}}"
    errors = f'{RPC}_count{{{sel},code!="OK"}}'
    bucket = f"{RPC}_bucket{{{sel}}}"
    return [
        layout.panel(
            "Requests / s",
            [(f"sum by ({by}) (rate({count}[{RATE}]))", legend)],
            unit="reqps",
            description="Calls per second, every status code.",
        ),
        layout.panel(
            "Error ratio (code != OK)",
            [
                (
                    f"sum by ({by}) (rate({errors}[{RATE}]))\n/\n"
                    f"sum by ({by}) (rate({count}[{RATE}]))",
                    legend,
                )
            ],
            unit="percentunit",
            threshold=1 - AVAILABILITY_SLO,
            description="Share of calls that ended with any status but OK (client errors "
            "included). The availability SLO counts only server faults; see the SLO row.",
        ),
        layout.panel(
            "p95 latency",
            [
                (
                    f"histogram_quantile(0.95, sum by ({by}, le) (rate({bucket}[{RATE}])))",
                    legend,
                )
            ],
            unit="s",
            threshold=LATENCY_SLO_SECONDS,
            description=f"95th percentile from the RPC histogram; the red line is the "
            f"latency SLO threshold ({LATENCY_SLO_SECONDS} s). Streaming RPCs last as long "
            "as their stream.",
        ),
        layout.panel(
            "Errors / s by code",
            [(f"sum by ({by}, code) (rate({errors}[{RATE}]))", f"{legend} {{{{code}}}}")],
            unit="reqps",
            stack=True,
        ),
    ]


def overview() -> dict[str, Any]:
    layout = Layout()
    sel = 'service=~"$service"'
    panels: list[dict[str, Any]] = [layout.row("Now")]
    panels += [
        layout.panel(
            "Requests / s",
            [(f"sum(rate({RPC}_count{{{sel}}}[{RATE}]))", "all")],
            unit="reqps",
            kind="stat",
            width=6,
            height=4,
        ),
        layout.panel(
            "Error ratio (code != OK)",
            [
                (
                    f'sum(rate({RPC}_count{{{sel},code!="OK"}}[{RATE}]))\n/\n'
                    f"sum(rate({RPC}_count{{{sel}}}[{RATE}]))",
                    "all",
                )
            ],
            unit="percentunit",
            kind="stat",
            width=6,
            height=4,
            threshold=1 - AVAILABILITY_SLO,
        ),
        layout.panel(
            "p95 latency",
            [
                (
                    f"histogram_quantile(0.95, sum by (le) (rate({RPC}_bucket{{{sel}}}[{RATE}])))",
                    "all",
                )
            ],
            unit="s",
            kind="stat",
            width=6,
            height=4,
            threshold=LATENCY_SLO_SECONDS,
        ),
        layout.panel(
            "Availability error budget burn (1h)",
            [
                (
                    f"max(service:ledgerlens_rpc_server_faults:ratio_rate1h{{{sel}}}) "
                    f"/ {1 - AVAILABILITY_SLO:g}",
                    "burn rate",
                )
            ],
            unit="x",
            kind="stat",
            width=6,
            height=4,
            threshold=14.4,
            description="The worst service's 1h burn rate of the 99.9% availability SLO "
            "(recording rule). 14.4 pages.",
        ),
    ]
    panels.append(layout.row("RED per service"))
    panels += rpc_panels(layout, sel, "service", "{{service}}")
    panels.append(layout.row("RED per method"))
    panels += [
        layout.panel(
            "Requests / s by method",
            [
                (
                    f"sum by (service, method) (rate({RPC}_count{{{sel}}}[{RATE}]))",
                    "{{service}}/{{method}}",
                )
            ],
            unit="reqps",
        ),
        layout.panel(
            "p95 latency by method",
            [
                (
                    "histogram_quantile(0.95, sum by (service, method, le) "
                    f"(rate({RPC}_bucket{{{sel}}}[{RATE}])))",
                    "{{service}}/{{method}}",
                )
            ],
            unit="s",
            threshold=LATENCY_SLO_SECONDS,
        ),
    ]
    panels.append(layout.row("SLOs (recording rules of infra/prometheus/rules)"))
    panels += [
        layout.panel(
            "Server-fault ratio (availability SLO 99.9%)",
            [
                (f"service:ledgerlens_rpc_server_faults:ratio_rate5m{{{sel}}}", "{{service}} 5m"),
                (f"service:ledgerlens_rpc_server_faults:ratio_rate1h{{{sel}}}", "{{service}} 1h"),
            ],
            unit="percentunit",
            threshold=1 - AVAILABILITY_SLO,
            description=f"Calls ending in {SERVER_FAULT_CODES} over all calls.",
        ),
        layout.panel(
            f"Slow-call ratio (latency SLO: 99% of unary calls < {LATENCY_SLO_SECONDS} s)",
            [
                (f"service:ledgerlens_rpc_server_slow:ratio_rate5m{{{sel}}}", "{{service}} 5m"),
                (f"service:ledgerlens_rpc_server_slow:ratio_rate1h{{{sel}}}", "{{service}} 1h"),
            ],
            unit="percentunit",
            threshold=0.01,
        ),
    ]
    return dashboard(
        "ledgerlens-overview",
        "ledgerlens / Platform overview",
        "RED metrics of every ledgerlens gRPC service and their SLOs.",
        panels,
        [service_var()],
        ["overview", "slo"],
    )


# -- events --------------------------------------------------------------------------------


def events() -> dict[str, Any]:
    layout = Layout()
    sub = 'subject=~"$subject"'
    consumed = "ledgerlens_events_consumed_total"
    panels: list[dict[str, Any]] = [layout.row("Flow (event bus metrics of the services)")]
    panels += [
        layout.panel(
            "Published / s",
            [
                (
                    f"sum by (subject) (rate(ledgerlens_events_published_total{{{sub}}}[{RATE}]))",
                    "{{subject}}",
                )
            ],
            unit="ops",
            description="Events acknowledged by JetStream (duplicates included).",
        ),
        layout.panel(
            "Consumed / s by outcome",
            [
                (
                    f"sum by (subject, outcome) (rate({consumed}{{{sub}}}[{RATE}]))",
                    "{{subject}} {{outcome}}",
                )
            ],
            unit="ops",
            description="Deliveries handled by consumers: acked, retried (nak with "
            "backoff: a redelivery follows) or dead_lettered.",
        ),
        layout.panel(
            "Handle duration p95",
            [
                (
                    "histogram_quantile(0.95, sum by (subject, le) "
                    f"(rate(ledgerlens_event_handle_duration_seconds_bucket{{{sub}}}[{RATE}])))",
                    "{{subject}}",
                )
            ],
            unit="s",
        ),
        layout.panel(
            "Redeliveries / s (handler failed, retried)",
            [
                (
                    f'sum by (subject) (rate({consumed}{{{sub},outcome="retried"}}[{RATE}]))',
                    "{{subject}}",
                )
            ],
            unit="ops",
            description="Every retried delivery is redelivered after a backoff of "
            "min(60 s, 2^(n-1) s).",
        ),
        layout.panel(
            "Dead letters in range",
            [
                (
                    f"sum by (subject) (increase({consumed}"
                    f'{{{sub},outcome="dead_lettered"}}[$__range]))',
                    "{{subject}}",
                )
            ],
            kind="stat",
            threshold=1,
            description="Messages moved to ledgerlens.deadletter.> after too many failed "
            "deliveries or an undecodable payload.",
        ),
        layout.panel(
            "Dead letters / s",
            [
                (
                    f'sum by (subject) (rate({consumed}{{{sub},outcome="dead_lettered"}}[{RATE}]))',
                    "{{subject}}",
                )
            ],
            unit="ops",
        ),
    ]
    state = (
        "JetStream's state of each durable consumer, read by the services running it every "
        "events_state_interval_seconds (15 s); replicas report the same value, hence max."
    )
    panels.append(layout.row("JetStream state (polled by the services)"))
    panels += [
        layout.panel(
            "Consumer pending",
            [
                (
                    "max by (stream, consumer) (ledgerlens_events_consumer_pending)",
                    "{{stream}}/{{consumer}}",
                )
            ],
            description=state + " Messages not yet delivered to each durable consumer.",
        ),
        layout.panel(
            "Consumer ack pending / redelivered",
            [
                (
                    "max by (stream, consumer) (ledgerlens_events_consumer_ack_pending)",
                    "ack pending {{stream}}/{{consumer}}",
                ),
                (
                    "max by (stream, consumer) (ledgerlens_events_consumer_redelivered)",
                    "redelivered {{stream}}/{{consumer}}",
                ),
            ],
            description=state + " Ack pending: delivered, not yet acked; redelivered: of "
            "those, delivered more than once.",
        ),
        layout.panel(
            "DEADLETTER stream messages",
            [
                (
                    'max(ledgerlens_events_dead_letter_messages{stream="DEADLETTER"})',
                    "DEADLETTER",
                )
            ],
            kind="stat",
            width=24,
            height=4,
            threshold=1,
            description="Messages kept in the DEADLETTER stream, as read by every service "
            "with consumers (the same total from each, hence max).",
        ),
    ]
    subject_var = query_var(
        "subject", "Subject", "ledgerlens_events_published_total", "subject", ".+"
    )
    return dashboard(
        "ledgerlens-events",
        "ledgerlens / Events",
        "Publish and consume rates, handler latency, redeliveries and dead letters.",
        panels,
        [subject_var],
        ["events", "nats"],
    )


# -- per-service dashboards -------------------------------------------------------------------


def service_dashboard(
    uid: str,
    title: str,
    grpc_service: str,
    description: str,
    domain: list[dict[str, Any]],
    layout: Layout,
    tags: list[str],
) -> dict[str, Any]:
    panels: list[dict[str, Any]] = [*domain]
    panels.append(layout.row(f"RED of {grpc_service} per method"))
    panels += rpc_panels(layout, f'service="{grpc_service}"', "method", "{{method}}")
    return dashboard(uid, title, description, panels, [], tags)


def events_of(layout: Layout, published: str | None, consumed: str) -> list[dict[str, Any]]:
    """Events panels of one service: what it publishes (``published`` subjects regex, if
    it publishes any) and the subjects it consumes."""
    panels: list[dict[str, Any]] = []
    if published is not None:
        panels.append(
            layout.panel(
                "Events published / s",
                [
                    (
                        "sum by (subject) (rate(ledgerlens_events_published_total"
                        f'{{subject=~"{published}"}}[{RATE}]))',
                        "{{subject}}",
                    )
                ],
                unit="ops",
            )
        )
    panels.append(
        layout.panel(
            "Events consumed / s",
            [
                (
                    "sum by (subject, outcome) (rate(ledgerlens_events_consumed_total"
                    f'{{subject=~"{consumed}"}}[{RATE}]))',
                    "{{subject}} {{outcome}}",
                )
            ],
            unit="ops",
            description="The events metrics carry the subject, not the consuming "
            "service: a subject several services consume is summed over all of them.",
        )
    )
    return panels


def ingestion() -> dict[str, Any]:
    layout = Layout()
    panels = [layout.row("Documents and events")]
    panels += [
        layout.panel(
            "IngestDocument calls / s by code",
            [
                (
                    f'sum by (code) (rate({RPC}_count{{service="ledgerlens.ingestion.v1.'
                    f'IngestionService",method=~"IngestDocument|IngestStream"}}[{RATE}]))',
                    "{{code}}",
                )
            ],
            unit="reqps",
            stack=True,
        ),
        layout.panel(
            "IngestDocument p95 (parse, chunk, embed, store)",
            [
                (
                    "histogram_quantile(0.95, sum by (le) (rate("
                    f'{RPC}_bucket{{service="ledgerlens.ingestion.v1.IngestionService",'
                    f'method="IngestDocument"}}[{RATE}])))',
                    "p95",
                )
            ],
            unit="s",
            threshold=LATENCY_SLO_SECONDS,
        ),
    ]
    panels += events_of(layout, "ledgerlens[.]ingestion[.].+", "ledgerlens[.]ledger[.].+")
    return service_dashboard(
        "ledgerlens-ingestion",
        "ledgerlens / Ingestion",
        "ledgerlens.ingestion.v1.IngestionService",
        "Ingest calls and latency, the events ingestion publishes and the anchors it consumes.",
        panels,
        layout,
        ["ingestion"],
    )


def retrieval() -> dict[str, Any]:
    layout = Layout()
    panels = [layout.row("Index")]
    panels += [
        layout.panel(
            "Chunks in the index",
            [("max(ledgerlens_retrieval_index_chunks)", "chunks")],
            kind="stat",
            width=6,
            height=8,
            description="Max over replicas (each reports the index it serves).",
        ),
        layout.panel(
            "Index lag p50 / p95",
            [
                (
                    "histogram_quantile(0.5, sum by (le) "
                    f"(rate(ledgerlens_retrieval_index_lag_seconds_bucket[{RATE}])))",
                    "p50",
                ),
                (
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(ledgerlens_retrieval_index_lag_seconds_bucket[{RATE}])))",
                    "p95",
                ),
            ],
            unit="s",
            width=18,
            description="From an ingestion.chunks.embedded event's publication to its "
            "chunks being searchable.",
        ),
        layout.panel(
            "Chunks indexed / removed / skipped per s",
            [
                (f"sum(rate(ledgerlens_retrieval_chunks_indexed_total[{RATE}]))", "indexed"),
                (f"sum(rate(ledgerlens_retrieval_chunks_removed_total[{RATE}]))", "removed"),
                (f"sum(rate(ledgerlens_retrieval_chunks_skipped_total[{RATE}]))", "skipped"),
            ],
            unit="ops",
            width=24,
            description="Skipped: chunks of a version already retired or deleted.",
        ),
    ]
    panels += events_of(layout, None, "ledgerlens[.](ingestion|ledger)[.].+")
    return service_dashboard(
        "ledgerlens-retrieval",
        "ledgerlens / Retrieval",
        "ledgerlens.retrieval.v1.RetrievalService",
        "Index size, indexing lag and throughput, search latency.",
        panels,
        layout,
        ["retrieval"],
    )


def ledger() -> dict[str, Any]:
    layout = Layout()
    panels = [layout.row("Transactions and anchors")]
    bucket = "ledgerlens_ledger_commit_duration_seconds_bucket"
    panels += [
        layout.panel(
            "Commit latency p50 / p95 / p99 by backend",
            [
                (
                    f"histogram_quantile({q}, sum by (backend, le) (rate({bucket}[{RATE}])))",
                    f"p{round(q * 100)} {{{{backend}}}}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s",
            description="From endorsement to a valid commit (retries included).",
        ),
        layout.panel(
            "Transactions / s by outcome",
            [
                (
                    "sum by (function, outcome) "
                    f"(rate(ledgerlens_ledger_transactions_total[{RATE}]))",
                    "{{function}} {{outcome}}",
                )
            ],
            unit="ops",
            stack=True,
            description="committed, pending (async), skipped (nothing new), or the gRPC "
            "code of a failure.",
        ),
        layout.panel(
            "Failed transactions / s",
            [
                (
                    "sum by (function, outcome) (rate(ledgerlens_ledger_transactions_total"
                    f'{{outcome!~"committed|pending|skipped"}}[{RATE}]))',
                    "{{function}} {{outcome}}",
                )
            ],
            unit="ops",
        ),
        layout.panel(
            "Documents per anchor transaction",
            [
                (
                    f"sum(rate(ledgerlens_ledger_anchor_batch_items_sum[{RATE}]))\n/\n"
                    f"sum(rate(ledgerlens_ledger_anchor_batch_items_count[{RATE}]))",
                    "mean",
                ),
                (
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(ledgerlens_ledger_anchor_batch_items_bucket[{RATE}])))",
                    "p95",
                ),
            ],
        ),
        layout.panel(
            "Anchors announced / s",
            [
                (
                    "sum(rate(ledgerlens_events_published_total"
                    f'{{subject="ledgerlens.ledger.anchor.committed.v1"}}[{RATE}]))',
                    "ledger.anchor.committed",
                ),
                (
                    f"sum by (event) (rate(ledgerlens_ledger_events_followed_total[{RATE}]))",
                    "chaincode event {{event}}",
                ),
            ],
            unit="ops",
        ),
    ]
    panels += events_of(
        layout, "ledgerlens[.]ledger[.].+", "ledgerlens[.](ingestion|inference)[.].+"
    )
    return service_dashboard(
        "ledgerlens-ledger",
        "ledgerlens / Ledger",
        "ledgerlens.ledger.v1.LedgerService",
        "Commit latency, transactions by outcome, anchoring batches and events.",
        panels,
        layout,
        ["ledger"],
    )


def inference() -> dict[str, Any]:
    layout = Layout()
    requests = "ledgerlens_inference_requests_total"
    provider_calls = "ledgerlens_inference_provider_requests_total"
    cache = "ledgerlens_inference_cache_total"
    panels = [layout.row("Gateway requests")]
    panels += [
        layout.panel(
            "Completion requests / s by outcome",
            [
                (
                    f"sum by (rpc, outcome) (rate({requests}[{RATE}]))",
                    "{{rpc}} {{outcome}}",
                )
            ],
            unit="reqps",
            stack=True,
            description="Chat, ChatStream, Embed, Answer and AnswerStream by outcome: ok, "
            "cache_hit, idempotent_replay, refused_moderation, limited, cancelled (the "
            "caller went away) or error (the RPC panels below show its code).",
        ),
        layout.panel(
            "Refused or failed share",
            [
                (
                    f"sum by (outcome) (rate({requests}"
                    f'{{outcome=~"refused_moderation|limited|error"}}[{RATE}]))\n/ ignoring '
                    f"(outcome) group_left\nsum(rate({requests}[{RATE}]))",
                    "{{outcome}}",
                )
            ],
            unit="percentunit",
            stack=True,
            description="Share of completion requests refused by moderation or a limit, or failed.",
        ),
    ]
    panels.append(layout.row("Providers"))
    panels += [
        layout.panel(
            "Provider calls / s by outcome",
            [
                (
                    f"sum by (provider, outcome) (rate({provider_calls}[{RATE}]))",
                    "{{provider}} {{outcome}}",
                )
            ],
            unit="ops",
            stack=True,
            description="Every attempt counts (retries included): ok, retryable_error "
            "(retried or fallen back) or error (not retryable).",
        ),
        layout.panel(
            "Provider call p95 by provider",
            [
                (
                    "histogram_quantile(0.95, sum by (provider, le) (rate("
                    f"ledgerlens_inference_provider_duration_seconds_bucket[{RATE}])))",
                    "{{provider}}",
                )
            ],
            unit="s",
            description="One provider call; a stream until its last delta.",
        ),
        layout.panel(
            "Fallbacks / s",
            [
                (
                    "sum by (from_provider, to_provider) "
                    f"(rate(ledgerlens_inference_fallbacks_total[{RATE}]))",
                    "{{from_provider}} -> {{to_provider}}",
                )
            ],
            unit="ops",
            width=24,
            description="Moves from a provider that failed retryably to the next target "
            "of the model's fallback chain.",
        ),
    ]
    panels.append(layout.row("Tokens and cost"))
    panels += [
        layout.panel(
            "Tokens / s by model and kind",
            [
                (
                    f"sum by (model, kind) (rate(ledgerlens_inference_tokens_total[{RATE}]))",
                    "{{model}} {{kind}}",
                )
            ],
            stack=True,
            description="Prompt and completion tokens providers processed, as accounted "
            "(the provider's usage, else a local count). Replays and cache hits spend none.",
        ),
        layout.panel(
            "Cost / hour by model (USD)",
            [
                (
                    f"sum by (model) (rate(ledgerlens_inference_cost_usd_total[{RATE}])) * 3600",
                    "{{model}}",
                )
            ],
            unit="currencyUSD",
            stack=True,
            description="From the configured prices (integer micro-USD per 1,000 tokens); "
            "models without a price (the local providers) cost 0.",
        ),
    ]
    panels.append(layout.row("Cache, limits and moderation"))
    panels += [
        layout.panel(
            "Cache hit ratio",
            [
                (
                    f'sum by (cache) (rate({cache}{{result="hit"}}[{RATE}]))\n/\n'
                    f"sum by (cache) (rate({cache}[{RATE}]))",
                    "{{cache}}",
                )
            ],
            unit="percentunit",
            width=8,
            description="response: deterministic (temperature 0) chat and answer "
            "requests; embeddings: per input text.",
        ),
        layout.panel(
            "Limiter refusals / s",
            [
                (
                    "sum by (scope, limit) "
                    f"(rate(ledgerlens_inference_rate_limited_total[{RATE}]))",
                    "{{scope}} {{limit}}",
                )
            ],
            unit="reqps",
            width=8,
            stack=True,
            description="RESOURCE_EXHAUSTED by the per-key and per-tenant limits.",
        ),
        layout.panel(
            "Moderation refusals / s",
            [
                (
                    "sum by (source) "
                    f"(rate(ledgerlens_inference_moderation_refusals_total[{RATE}]))",
                    "{{source}}",
                )
            ],
            unit="reqps",
            width=8,
            stack=True,
            description="Inputs refused by the moderation screen (PERMISSION_DENIED): the "
            "local rules or the moderation provider.",
        ),
    ]
    panels.append(layout.row("Events"))
    panels += events_of(layout, "ledgerlens[.]inference[.].+", "ledgerlens[.]identity[.].+")
    return service_dashboard(
        "ledgerlens-inference",
        "ledgerlens / Inference",
        "ledgerlens.inference.v1.InferenceService",
        "Gateway outcomes, providers and fallbacks, tokens and cost, cache, limits, "
        "moderation and the completion events.",
        panels,
        layout,
        ["inference"],
    )


def identity() -> dict[str, Any]:
    layout = Layout()
    issued = "ledgerlens_identity_tokens_issued_total"
    failures = "ledgerlens_identity_token_failures_total"
    panels = [layout.row("Tokens")]
    panels += [
        layout.panel(
            "Tokens issued / s by grant",
            [(f"sum by (grant, via) (rate({issued}[{RATE}]))", "{{grant}} {{via}}")],
            unit="ops",
            stack=True,
            description="Access tokens issued: IssueToken (grpc) and POST /oauth/token (http).",
        ),
        layout.panel(
            "Token failures / s by reason",
            [(f"sum by (reason) (rate({failures}[{RATE}]))", "{{reason}}")],
            unit="reqps",
            stack=True,
            description="Refused token requests: invalid_client (unknown key or wrong "
            "secret), revoked, expired, invalid_scope, invalid_audience, rate_limited, "
            "invalid_request, unsupported_grant_type, error.",
        ),
        layout.panel(
            "Token failure ratio",
            [
                (
                    f"sum(rate({failures}[{RATE}]))\n/\n"
                    f"(sum(rate({failures}[{RATE}])) + sum(rate({issued}[{RATE}])))",
                    "failed",
                )
            ],
            unit="percentunit",
            threshold=TOKEN_FAILURE_RATIO,
            description="Share of token requests refused; the red line is the "
            "LedgerlensIdentityTokenFailureSpike alert's threshold.",
        ),
        layout.panel(
            "Rate-limit refusals / s",
            [
                (
                    f"sum by (scope) (rate(ledgerlens_identity_rate_limited_total[{RATE}]))",
                    "{{scope}}",
                )
            ],
            unit="reqps",
            stack=True,
            description="IssueToken refused by the per-key and per-address limits.",
        ),
        layout.panel(
            "Introspections / s by result",
            [
                (
                    f"sum by (result) (rate(ledgerlens_identity_introspections_total[{RATE}]))",
                    "{{result}}",
                )
            ],
            unit="reqps",
            stack=True,
            width=24,
        ),
    ]
    panels.append(layout.row("Keys"))
    panels += [
        layout.panel(
            "API keys created / revoked",
            [
                (
                    f"sum by (action) (increase(ledgerlens_identity_api_keys_total[{RATE}]))",
                    "{{action}}",
                )
            ],
            description="Keys created and revoked in each interval.",
        ),
        layout.panel(
            "Signing key age vs rotation period",
            [
                ("max(ledgerlens_identity_signing_key_age_seconds)", "active key age"),
                (
                    "max(ledgerlens_identity_signing_key_rotation_period_seconds)",
                    "rotation period",
                ),
            ],
            unit="s",
            description="The active signing key's age (as the replicas last read it) "
            "against the setting signing_key_rotation_days; past it, "
            "LedgerlensIdentitySigningKeyOverdue fires.",
        ),
        layout.panel(
            "Signing key rotations",
            [
                (
                    f"sum(increase(ledgerlens_identity_signing_key_rotations_total[{RATE}]))",
                    "rotations",
                )
            ],
            width=24,
        ),
    ]
    panels.append(layout.row("Certificate authority"))
    panels += [
        layout.panel(
            "CA operations / s",
            [
                (
                    "sum by (operation, outcome) "
                    f"(rate(ledgerlens_identity_ca_operations_total[{RATE}]))",
                    "{{operation}} {{outcome}}",
                )
            ],
            unit="ops",
            stack=True,
            width=24,
            description="Enrollments, revocations and CRLs (GetCrl, POST gencrl) over gRPC "
            "and the Fabric CA REST subset; refused: bad CSR, wrong secret, not allowed, "
            "not found.",
        ),
    ]
    panels.append(layout.row("Events"))
    panels += events_of(layout, "ledgerlens[.]identity[.].+", "ledgerlens[.]identity[.].+")
    return service_dashboard(
        "ledgerlens-identity",
        "ledgerlens / Identity",
        "ledgerlens.identity.v1.IdentityService",
        "Tokens issued and refused, rate limits, introspections, API keys, signing key "
        "age and rotations, CA operations and key revocation events.",
        panels,
        layout,
        ["identity"],
    )


DASHBOARDS = {
    "ledgerlens-overview.json": overview,
    "ledgerlens-events.json": events,
    "ledgerlens-ingestion.json": ingestion,
    "ledgerlens-retrieval.json": retrieval,
    "ledgerlens-ledger.json": ledger,
    "ledgerlens-inference.json": inference,
    "ledgerlens-identity.json": identity,
}


def render() -> dict[str, str]:
    """File name -> the JSON text this script writes."""
    return {
        name: json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    args = parser.parse_args(argv)
    rendered = render()
    stale = sorted(
        name
        for name, text in rendered.items()
        if not (OUT / name).exists() or (OUT / name).read_text(encoding="utf-8") != text
    )
    extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in rendered)
    if args.check:
        for name in stale + extra:
            print(f"out of date: infra/grafana/dashboards/{name}", file=sys.stderr)
        return 1 if stale or extra else 0
    OUT.mkdir(exist_ok=True)
    for name in stale:
        (OUT / name).write_text(rendered[name], encoding="utf-8")
    for name in extra:
        (OUT / name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

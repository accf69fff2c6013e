"""The ledgerlens service graph, as data: who talks to whom, on which port.

Taken from /work/shared/ARCHITECTURE.md (the design card):
- "Services": five services, each a gRPC API plus an ops/REST HTTP app; clients call the
  gRPC APIs; inference answers with passages it retrieves (inference -> retrieval gRPC).
- "Every RPC except health and JWKS requires a bearer JWT issued by identity; services
  verify it locally against identity's JWKS": every other service -> identity HTTP.
- "Events (NATS JetStream)": every service publishes or consumes -> NATS 4222.
- "Storage ... at scale (Helm)": relational state in PostgreSQL (every service); cache and
  rate limits in Redis (identity's IssueToken limits, inference's cache/quotas); the
  vector index in Qdrant (retrieval, REST 6333 and gRPC 6334); LLM providers (inference,
  HTTPS); Hyperledger Fabric peers through the Gateway (ledger, 7051).
- "Deployment": Prometheus scrapes every service's /metrics (HTTP port); the `helm test`
  pod checks each service's gRPC health.

The chart tests derive the allowed (from, to, port) flows from the rendered
NetworkPolicies and compare them with :func:`expected_flows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: the ports of ARCHITECTURE's services (each service's settings.py has the same defaults)
SERVICE_PORTS: dict[str, dict[str, int]] = {
    "identity": {"grpc": 50051, "http": 8081},
    "ingestion": {"grpc": 50052, "http": 8082},
    "retrieval": {"grpc": 50053, "http": 8083},
    "inference": {"grpc": 50054, "http": 8084},
    "ledger": {"grpc": 50055, "http": 8085},
}
SERVICES = tuple(SERVICE_PORTS)

#: what lives outside the release, and the ports they are reached on
EXTERNAL_PORTS: dict[str, tuple[int, ...]] = {
    "dns": (53,),
    "nats": (4222,),
    "postgresql": (5432,),
    "redis": (6379,),
    "qdrant": (6333, 6334),
    "llm-providers": (443,),
    "fabric-peers": (7051,),
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    #: "grpc" / "http" of a service, or an external's name (its ports)
    port: str
    #: the deployment condition under which the flow exists (see expected_flows)
    when: str = "always"


def _edges() -> list[Edge]:
    edges: list[Edge] = []
    for svc in SERVICES:
        edges += [
            Edge("clients", svc, "grpc"),
            Edge("ingress", svc, "grpc", when="ingress"),
            Edge("helm-test", svc, "grpc", when="helm-test"),
            Edge("monitoring", svc, "http", when="monitoring"),
            Edge(svc, "dns", "dns"),
            Edge(svc, "nats", "nats"),
            Edge(svc, "postgresql", "postgresql", when="postgresql"),
        ]
        if svc != "identity":
            edges.append(Edge(svc, "identity", "http"))  # JWKS
    edges += [
        Edge("inference", "retrieval", "grpc"),
        Edge("identity", "redis", "redis", when="redis"),
        Edge("inference", "redis", "redis", when="redis"),
        Edge("retrieval", "qdrant", "qdrant", when="qdrant"),
        Edge("inference", "llm-providers", "llm-providers", when="egress-cidrs"),
        Edge("ledger", "fabric-peers", "fabric-peers", when="egress-cidrs"),
    ]
    return edges


EDGES: tuple[Edge, ...] = tuple(_edges())


def _holds(edge: Edge, values: dict[str, Any]) -> bool:
    services = values["services"]
    np = values["networkPolicy"]
    when = edge.when
    if when == "always":
        return True
    if when == "ingress":
        return bool(np.get("ingressNamespace"))
    if when == "monitoring":
        return bool(np.get("monitoringNamespace"))
    if when == "helm-test":
        return bool(values["tests"]["enabled"])
    if when == "postgresql":
        return bool(values["externalPostgresql"]["enabled"])
    if when == "redis":
        return bool(values["externalRedis"]["enabled"])
    if when == "qdrant":
        return services["retrieval"].get("backend") == "qdrant"
    if when == "egress-cidrs":
        return any(
            rule["name"] == edge.target and rule["cidrs"]
            for rule in services[edge.source].get("egress", [])
        )
    raise ValueError(f"unknown condition {when!r}")


def expected_flows(values: dict[str, Any]) -> set[tuple[str, str, int]]:
    """(from, to, port) of every flow the graph allows for these (coalesced) chart values,
    among the enabled services."""
    enabled = {name for name, svc in values["services"].items() if svc["enabled"]}
    flows: set[tuple[str, str, int]] = set()
    for edge in EDGES:
        if (edge.source in SERVICE_PORTS and edge.source not in enabled) or (
            edge.target in SERVICE_PORTS and edge.target not in enabled
        ):
            continue
        if not _holds(edge, values):
            continue
        if edge.target in SERVICE_PORTS:
            ports: tuple[int, ...] = (SERVICE_PORTS[edge.target][edge.port],)
        else:
            ports = EXTERNAL_PORTS[edge.port]
        flows.update((edge.source, edge.target, port) for port in ports)
    return flows

"""The rendered NetworkPolicies allow exactly the flows of the service graph.

The (from, to, port) flows are derived from the policies themselves: each peer selector is
evaluated against the pods the release renders plus the pods around it (a client pod
with the client label, the ingress controller, Prometheus, kube-dns), and a flow between
two ledgerlens services counts only when the source's egress and the target's ingress
both allow it. The result must equal service_graph.expected_flows for the values set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
from _renders import Rendered
from service_graph import EXTERNAL_PORTS, SERVICE_PORTS, expected_flows

NAMESPACE = "ledgerlens"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def _pod(name: str, namespace: str, labels: dict[str, str]) -> Pod:
    return Pod(name, namespace, tuple(sorted(labels.items())))


def world(rendered: Rendered) -> list[Pod]:
    """The release's pods (the dev NATS pod is the "nats" dependency) and the pods around
    it that the graph names, plus two that no policy may admit."""
    pods = []
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "Rollout"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            pods.append(_pod(labels["app.kubernetes.io/name"], NAMESPACE, labels))
        elif obj["kind"] == "Pod":
            pods.append(_pod("helm-test", NAMESPACE, obj["metadata"]["labels"]))
    np = rendered.values["networkPolicy"]
    client_labels = np["clients"]["podSelector"]["matchLabels"]
    pods.append(_pod("clients", NAMESPACE, {**client_labels, "app": "some-client"}))
    pods.append(_pod("not-a-client", NAMESPACE, {"app": "some-other-app"}))
    pods.append(_pod("ingress", np["ingressNamespace"] or "ingress-nginx", {"app": "ingress"}))
    pods.append(_pod("monitoring", np["monitoringNamespace"] or "monitoring", {"app": "prom"}))
    pods.append(_pod("dns", "kube-system", {"k8s-app": "kube-dns"}))
    pods.append(_pod("elsewhere", "other", {"ledgerlens.io/client": "true"}))
    return pods


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and present and value in expr["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def peer_pods(peer: dict[str, Any], pods: list[Pod]) -> set[str]:
    assert "ipBlock" not in peer
    out = set()
    for pod in pods:
        if "namespaceSelector" in peer:
            ns_labels = {"kubernetes.io/metadata.name": pod.namespace}
            if not selects(peer["namespaceSelector"], ns_labels):
                continue
        elif pod.namespace != NAMESPACE:
            continue
        if selects(peer.get("podSelector"), pod.label_map):
            out.add(pod.name)
    return out


def external_by_port(port: int) -> str:
    names = [name for name, ports in EXTERNAL_PORTS.items() if port in ports]
    assert len(names) == 1, f"port {port} names no external dependency"
    return names[0]


def derive(rendered: Rendered) -> tuple[set[tuple[str, str, int]], set[tuple[str, str, int]]]:
    """(ingress flows, egress flows) that the rendered policies allow."""
    pods = world(rendered)
    ingress: set[tuple[str, str, int]] = set()
    egress: set[tuple[str, str, int]] = set()
    for policy in rendered.of_kind("NetworkPolicy"):
        spec = policy["spec"]
        selected = {
            p.name
            for p in pods
            if p.namespace == NAMESPACE and selects(spec["podSelector"], p.label_map)
        }
        if policy["metadata"]["name"] == "ledgerlens-default-deny":
            assert "ingress" not in spec
            assert "egress" not in spec
            continue
        assert len(selected) == 1, f"{policy['metadata']['name']} selects {selected}"
        (owner,) = selected
        for rule in spec.get("ingress", []):
            sources = set().union(*(peer_pods(p, pods) for p in rule["from"]))
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP"
                ingress.update((src, owner, port["port"]) for src in sources)
        for rule in spec.get("egress", []):
            for port in rule["ports"]:
                if "to" not in rule:  # any address on this port: an external dependency
                    egress.add((owner, external_by_port(port["port"]), port["port"]))
                    continue
                for peer in rule["to"]:
                    if "ipBlock" in peer:
                        egress.add((owner, external_by_port(port["port"]), port["port"]))
                    else:
                        egress.update((owner, dst, port["port"]) for dst in peer_pods(peer, pods))
    return ingress, egress


def flows(rendered: Rendered) -> set[tuple[str, str, int]]:
    ingress, egress = derive(rendered)
    internal = set(SERVICE_PORTS)
    both = {f for f in ingress | egress if f[0] in internal and f[1] in internal}
    one_sided = {f for f in both if not (f in ingress and f in egress)}
    assert not one_sided, f"allowed on one side only: {sorted(one_sided)}"
    out = {f for f in ingress if f[0] not in internal}
    out |= {f for f in egress if f[1] not in internal}
    out |= both
    return out


def test_default_deny_covers_every_service_pod(rendered: Rendered) -> None:
    deny = rendered.get("NetworkPolicy", "ledgerlens-default-deny")["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    for svc in rendered.enabled:
        labels = rendered.workload(svc)["spec"]["template"]["metadata"]["labels"]
        assert selects(deny["podSelector"], labels)


def test_policies_allow_exactly_the_service_graph(rendered: Rendered) -> None:
    derived = flows(rendered)
    expected = expected_flows(rendered.values)
    assert sorted(derived - expected) == [], "allowed but not in the graph"
    assert sorted(expected - derived) == [], "in the graph but not allowed"


def test_graph_has_the_flows_that_matter(renders: dict[str, Rendered]) -> None:
    flows_ = expected_flows(renders["prod"].values)
    assert ("inference", "retrieval", 50053) in flows_
    assert ("ledger", "identity", 8081) in flows_
    assert ("retrieval", "qdrant", 6334) in flows_
    assert ("ledger", "fabric-peers", 7051) in flows_
    assert not any(f[0] == "ledger" and f[1] == "retrieval" for f in flows_)
    assert not any(f[1] == "redis" and f[0] not in ("identity", "inference") for f in flows_)


def test_a_stray_or_missing_rule_is_caught(renders: dict[str, Rendered]) -> None:
    retrieval_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "retrieval"}}}
    ledger_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ledger"}}}
    grpc_port = [{"port": 50053, "protocol": "TCP"}]

    one_sided = copy.deepcopy(renders["prod"])
    ledger = one_sided.get("NetworkPolicy", "ledgerlens-ledger")
    ledger["spec"]["egress"].append({"to": [retrieval_peer], "ports": grpc_port})
    with pytest.raises(AssertionError, match="one side only"):
        flows(one_sided)

    # ledger -> retrieval allowed on both sides: a flow the graph does not have
    retrieval = one_sided.get("NetworkPolicy", "ledgerlens-retrieval")
    retrieval["spec"]["ingress"].append({"from": [ledger_peer], "ports": grpc_port})
    assert ("ledger", "retrieval", 50053) in flows(one_sided) - expected_flows(one_sided.values)

    missing = copy.deepcopy(renders["prod"])
    identity = missing.get("NetworkPolicy", "ledgerlens-identity")
    identity["spec"]["ingress"][1]["from"].pop()  # one caller loses the JWKS
    with pytest.raises(AssertionError, match=r"\('retrieval', 'identity', 8081\)"):
        flows(missing)

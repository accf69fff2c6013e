"""Bad input over gRPC: every RPC of the five services gets fuzzed requests.

Requests come from two Hypothesis strategies over the request's descriptor
(``_proto_strategies``): whole messages of fuzzed fields, and a valid request with one
field changed (so checks past the first one are reached). They go over real sockets to
the services running in this process, with a token holding every scope. For each:

- the status is never INTERNAL, UNKNOWN or DATA_LOSS, and a call is answered within its
  deadline (only ``GetCommitStatus(wait=true)`` may wait it out, by contract);
- a refused call (any status but OK) leaves the row count of every table of the
  service's database as it was: no partial write;
- afterwards the service still serves (health SERVING, and its valid request is not
  answered with a forbidden status).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from _fuzz_stack import FuzzStack
from _grpc_methods import (
    FORBIDDEN,
    VALID,
    Method,
    Outcome,
    call,
    descriptor_method_count,
    discover_methods,
    item_errors,
)
from _proto_strategies import messages, mutations
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.integration, pytest.mark.slow]

METHODS = discover_methods()
#: examples per RPC; derandomized, so every run sends the same requests
MAX_EXAMPLES = 30


def test_every_rpc_of_every_contract_is_fuzzed() -> None:
    ids = [m.id for m in METHODS]
    assert len(ids) == len(set(ids)) == descriptor_method_count()
    # a new RPC is fuzzed from its descriptor at once; its valid request is added here
    assert set(VALID) == set(ids), set(ids) ^ set(VALID)


async def _exchange(
    stack: FuzzStack, method: Method, requests: list[Message]
) -> tuple[Outcome, dict[str, int], dict[str, int]]:
    before = await stack.settled_counts(method.service)
    outcome = await call(stack.channels[method.service], method, requests, stack.metadata)
    after = await stack.row_counts(method.service)
    if outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        stack.dirty.add(method.service)
    return outcome, before, after


def _describe(requests: list[Message]) -> str:
    text = " | ".join(str(r) for r in requests)
    return text if len(text) < 2000 else text[:2000] + "..."


def _check(method: Method, requests: list[Message], result: Any) -> None:
    outcome, before, after = result
    shown = _describe(requests)
    assert outcome.code not in FORBIDDEN, (
        f"{method.id} answered {outcome.code.name} ({outcome.details}) to: {shown}"
    )
    forbidden_items = {code.value[0] for code in FORBIDDEN}
    for response in outcome.responses:
        for code, message in item_errors(response):
            assert code not in forbidden_items, (
                f"{method.id} answered an item with code {code} ({message}) to: {shown}"
            )
    waits = any(getattr(r, "wait", False) is True for r in requests)
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert waits, f"{method.id} did not answer within its deadline: {shown}"
    if outcome.code == grpc.StatusCode.CANCELLED:
        assert outcome.cancelled_by_client, f"{method.id} was cancelled by the server: {shown}"
    elif outcome.code != grpc.StatusCode.OK:
        changed = {t: (before.get(t), after.get(t)) for t in after if before.get(t) != after[t]}
        assert not changed, (
            f"{method.id} refused ({outcome.code.name}: {outcome.details}) but wrote rows "
            f"{changed}: {shown}"
        )


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.id)
def test_fuzzed_requests_get_a_proper_status_and_write_nothing_when_refused(
    fuzz_stack: FuzzStack, method: Method
) -> None:
    valid = VALID.get(method.id, lambda _: method.request_class())(fuzz_stack.seed)
    one = st.one_of(messages(method.descriptor.input_type), mutations(valid))
    many = st.lists(one, min_size=1, max_size=3) if method.descriptor.client_streaming else None
    strategy = many if many is not None else one.map(lambda m: [m])
    codes: dict[str, int] = {}

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests=strategy)
    def fuzz(requests: list[Message]) -> None:
        result = fuzz_stack.run(_exchange(fuzz_stack, method, requests))
        codes[result[0].code.name] = codes.get(result[0].code.name, 0) + 1
        _check(method, requests, result)

    fuzz()
    print(f"{method.id}: {dict(sorted(codes.items()))}")

    # still serving: health, and the valid request gets a proper answer
    async def health() -> int:
        stub = health_pb2_grpc.HealthStub(fuzz_stack.channels[method.service])
        full_name = method.descriptor.containing_service.full_name
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=full_name), timeout=10)
        return int(answer.status)

    assert fuzz_stack.run(health()) == health_pb2.HealthCheckResponse.SERVING
    _check(method, [valid], fuzz_stack.run(_exchange(fuzz_stack, method, [valid])))

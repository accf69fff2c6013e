"""Bad input over HTTP: schemathesis fuzzes every service's REST/ops app from its OpenAPI.

Each service's FastAPI app (``/healthz``, ``/readyz``, and identity's OAuth2 token
endpoint, JWKS and Fabric CA compatible ``/api/v1`` endpoints) is fuzzed over a real
socket, from the ``/openapi.json`` the running app serves. Checks: never a 5xx
(``not_a_server_error``), the response matches the schema where one is declared
(``response_schema_conformance``), and a refused request (4xx) to identity leaves the
row count of every identity table unchanged: no partial write.

The Fabric CA routes read their JSON body by hand; identity declares those bodies (and
the token header) in its OpenAPI, so the fuzzer sends real-looking bodies and not only
empty ones.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from _fuzz_stack import FuzzStack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
]

CHECKS = [not_a_server_error, response_schema_conformance]
FUZZ_SETTINGS = settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

FABRIC_CA = ("enroll", "revoke", "gencrl", "cainfo")


def _load(stack: FuzzStack, svc: str) -> Any:
    base = stack.running[svc].http_url
    document = httpx.get(f"{base}/openapi.json", timeout=10).raise_for_status().json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=base)
    return schema


@pytest.fixture(scope="session")
def identity_api(fuzz_stack: FuzzStack) -> Any:
    return _load(fuzz_stack, "identity")


def test_identity_documents_its_rest_facade(identity_api: Any) -> None:
    """The endpoints that matter are in the schema the fuzzer works from."""
    paths = {op.ok().path for op in identity_api.get_all_operations()}
    expected = {"/healthz", "/readyz", "/oauth/token", "/.well-known/jwks.json"}
    expected |= {f"/api/v1/{name}" for name in FABRIC_CA}
    assert expected <= paths, expected - paths


def _call_and_check(stack: FuzzStack, svc: str, case: Any, seen: dict[str, int]) -> None:
    before = stack.run(stack.settled_counts(svc))
    response = case.call(timeout=30)
    key = f"{case.method} {case.operation.path} {response.status_code}"
    seen[key] = seen.get(key, 0) + 1
    case.validate_response(response, checks=CHECKS)
    after = stack.run(stack.row_counts(svc))
    if response.status_code < 400:
        stack.dirty.add(svc)
        return
    changed = {t: (before.get(t), n) for t, n in after.items() if before.get(t) != n}
    assert not changed, (
        f"{case.method} {case.formatted_path} refused with {response.status_code} but wrote "
        f"rows {changed}: {case.as_curl_command()}"
    )


def _has_inputs(operation: Any) -> bool:
    return any(
        len(part)
        for part in (operation.body, operation.query, operation.headers, operation.path_parameters)
    )


# schemathesis's own pytest integration (``schemathesis.pytest.from_fixture``) does not
# run under pytest 9 (it sets ``Function._nodeid``); its Python API (``as_strategy``,
# ``call``, ``validate_response``) with Hypothesis's ``@given`` does the same work.
@pytest.mark.parametrize("svc", ["identity", "ingestion", "retrieval", "inference", "ledger"])
def test_rest_facade_never_fails_on_bad_input(fuzz_stack: FuzzStack, svc: str) -> None:
    schema = _load(fuzz_stack, svc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/healthz", "/readyz"} <= {op.path for op in operations}
    seen: dict[str, int] = {}
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if _has_inputs(operation):
            modes.append(GenerationMode.NEGATIVE)
        strategy = st.one_of(*(operation.as_strategy(generation_mode=m) for m in modes))

        @FUZZ_SETTINGS
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            _call_and_check(fuzz_stack, svc, case, seen)

        fuzz()
    print(f"{svc}: {dict(sorted(seen.items()))}")
    called = {key.rsplit(" ", 1)[0] for key in seen}
    assert called == {f"{op.method.upper()} {op.path}" for op in operations}


# ``/metrics`` is left out of the OpenAPI (``include_in_schema=False``), so schemathesis
# never sees it; its one input is the Accept header (text format or OpenMetrics).
_ACCEPT = st.one_of(
    st.sampled_from(
        [
            "",
            "*/*",
            "text/plain",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "application/openmetrics-text; version=9",
            "application/openmetrics-text;;;",
            "text/plain; version=0.0.4, application/openmetrics-text; q=0.1",
        ]
    ),
    # printable ASCII; h11 (the client) refuses leading or trailing blanks itself
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(str.strip),
)


@pytest.mark.parametrize("svc", ["identity", "ingestion", "retrieval", "inference", "ledger"])
def test_metrics_never_fails_on_any_accept_header(fuzz_stack: FuzzStack, svc: str) -> None:
    url = f"{fuzz_stack.running[svc].http_url}/metrics"
    statuses: set[int] = set()
    with httpx.Client(timeout=10) as client:

        @FUZZ_SETTINGS
        @given(accept=_ACCEPT)
        def fuzz(accept: str) -> None:
            response = client.get(url, headers={"accept": accept})
            statuses.add(response.status_code)
            assert response.status_code < 500, (accept, response.status_code, response.text)
            if response.status_code == 200:
                assert "ledgerlens_rpc_server_duration_seconds" in response.text

        fuzz()
    assert 200 in statuses

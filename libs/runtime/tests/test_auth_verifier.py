"""TokenVerifier against a JWKS served over real HTTP: caching, rotation, rate limits."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ledgerlens.runtime.auth import DevTokenIssuer, TokenVerifier
from ledgerlens.runtime.errors import Unauthenticated, Unavailable
from ledgerlens.runtime.settings import AuthSettings


class JwksServer:
    """A real HTTP server whose JWKS document the test can swap; counts GETs."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests = 0
        self.delay = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                time.sleep(owner.delay)
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, *issuers: DevTokenIssuer) -> None:
        self.document = {"keys": [i.public_jwk() for i in issuers]}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def _verifier(url: str, **kwargs: Any) -> TokenVerifier:
    kwargs.setdefault("jwks_min_refresh_seconds", 0.0)
    return TokenVerifier(
        issuer="ledgerlens-identity", audience="ledgerlens", jwks_url=url, **kwargs
    )


async def test_keys_are_fetched_once_and_cached(jwks_server: JwksServer) -> None:
    issuer = DevTokenIssuer()
    jwks_server.serve(issuer)
    verifier = _verifier(jwks_server.url)
    try:
        for i in range(20):  # distinct tokens: every one is a full signature check
            principal = await verifier.verify(issuer.issue(f"user{i}", ["search:read"]))
            assert principal.subject == f"user{i}"
        assert jwks_server.requests == 1
    finally:
        await verifier.aclose()


async def test_an_unknown_kid_triggers_a_refetch_after_rotation(jwks_server: JwksServer) -> None:
    old, new = DevTokenIssuer(), DevTokenIssuer()
    jwks_server.serve(old)
    verifier = _verifier(jwks_server.url)
    try:
        old_token = old.issue("alice", ["search:read"])
        await verifier.verify(old_token)
        assert jwks_server.requests == 1

        jwks_server.serve(new)  # identity rotated and retired the old key
        principal = await verifier.verify(new.issue("bob", ["search:read"]))
        assert principal.subject == "bob"
        assert jwks_server.requests == 2

        # the old key left the set: its token, verified before, is no longer accepted
        with pytest.raises(Unauthenticated) as err:
            await verifier.verify(old_token)
        assert err.value.reason == "TOKEN_KID_UNKNOWN"
    finally:
        await verifier.aclose()


async def test_unknown_kid_refetches_are_rate_limited(jwks_server: JwksServer) -> None:
    issuer = DevTokenIssuer()
    jwks_server.serve(issuer)
    verifier = _verifier(jwks_server.url, jwks_min_refresh_seconds=0.3)
    try:
        await verifier.verify(issuer.issue("alice"))
        bogus = DevTokenIssuer().issue("mallory")
        for _ in range(5):  # the same made-up kid again and again
            with pytest.raises(Unauthenticated):
                await verifier.verify(bogus)
        assert jwks_server.requests == 2  # looked for once, then remembered as missing

        async def refused(token: str) -> None:
            with pytest.raises(Unauthenticated):
                await verifier.verify(token)

        # a flood of different made-up kids at once shares one refetch
        await asyncio.gather(*(refused(DevTokenIssuer().issue("m")) for _ in range(10)))
        assert jwks_server.requests == 3
    finally:
        await verifier.aclose()


async def test_a_key_published_right_after_a_fetch_is_still_accepted(
    jwks_server: JwksServer,
) -> None:
    old, new = DevTokenIssuer(), DevTokenIssuer()
    jwks_server.serve(old)
    verifier = _verifier(jwks_server.url, jwks_min_refresh_seconds=0.3)
    try:
        await verifier.verify(old.issue("alice"))  # fetched just now
        jwks_server.serve(old, new)  # a rotation publishes a new key
        principal = await verifier.verify(new.issue("bob"))  # waits out the interval
        assert principal.subject == "bob"
        assert jwks_server.requests == 2
    finally:
        await verifier.aclose()


async def test_concurrent_refetches_are_coalesced(jwks_server: JwksServer) -> None:
    old, new = DevTokenIssuer(), DevTokenIssuer()
    jwks_server.serve(old)
    verifier = _verifier(jwks_server.url)
    try:
        await verifier.verify(old.issue("alice"))
        jwks_server.serve(old, new)
        jwks_server.delay = 0.2
        tokens = [new.issue(f"u{i}") for i in range(10)]
        principals = await asyncio.gather(*(verifier.verify(t) for t in tokens))
        assert [p.subject for p in principals] == [f"u{i}" for i in range(10)]
        assert jwks_server.requests == 2  # one initial fetch, one shared refetch
    finally:
        await verifier.aclose()


async def test_the_cache_expires(jwks_server: JwksServer) -> None:
    issuer = DevTokenIssuer()
    jwks_server.serve(issuer)
    verifier = _verifier(jwks_server.url, jwks_cache_seconds=0.2)
    try:
        token = issuer.issue("alice")
        await verifier.verify(token)
        await verifier.verify(token)
        assert jwks_server.requests == 1
        await asyncio.sleep(0.3)
        await verifier.verify(token)
        assert jwks_server.requests == 2
    finally:
        await verifier.aclose()


async def test_no_reachable_jwks_is_unavailable() -> None:
    verifier = _verifier("http://127.0.0.1:9/jwks.json", http_timeout_seconds=1)
    try:
        with pytest.raises(Unavailable):
            await verifier.verify(DevTokenIssuer().issue("alice"))
    finally:
        await verifier.aclose()


async def test_eddsa_and_static_keys_from_settings() -> None:
    ed, ec = DevTokenIssuer(algorithm="EdDSA"), DevTokenIssuer()
    jwks = json.dumps({"keys": [ed.public_jwk(), ec.public_jwk()]})
    verifier = TokenVerifier.from_settings(AuthSettings(static_jwks=jwks))
    principal = await verifier.verify(ed.issue("eve", ["a", "b"], tenant="t1"))
    assert (principal.subject, principal.tenant, principal.scopes) == (
        "eve",
        "t1",
        frozenset({"a", "b"}),
    )
    assert (await verifier.verify(ec.issue("carl"))).subject == "carl"


async def test_scopes_claim_as_a_list() -> None:
    issuer = DevTokenIssuer()
    verifier = TokenVerifier(issuer=issuer.issuer, audience="ledgerlens", static_jwks=issuer.jwks())
    token = issuer.issue("svc", extra_claims={"scope": None, "scopes": ["x:read", "y:write"]})
    # no usable "scope" string: the "scopes" list is used instead
    principal = await verifier.verify(token)
    assert principal.scopes == {"x:read", "y:write"}


async def test_hmac_keys_in_a_jwks_are_ignored() -> None:
    issuer = DevTokenIssuer()
    doc = issuer.jwks()
    doc["keys"].append({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"})
    verifier = TokenVerifier(issuer=issuer.issuer, audience="ledgerlens", static_jwks=doc)
    assert set(verifier._keys) == {issuer.kid}


def test_unsafe_algorithms_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="HS256"):
        TokenVerifier(issuer="i", audience="a", static_jwks={"keys": []}, algorithms=["HS256"])
    with pytest.raises(ValueError, match="none"):
        TokenVerifier(issuer="i", audience="a", static_jwks={"keys": []}, algorithms=["none"])


async def test_a_remembered_token_still_expires() -> None:
    issuer = DevTokenIssuer()
    verifier = TokenVerifier(
        issuer=issuer.issuer, audience="ledgerlens", static_jwks=issuer.jwks(), leeway_seconds=0
    )
    now = time.time()
    token = issuer.issue("alice", issued_at=now - 60, ttl=61.5)  # exp within 1.5 s
    await verifier.verify(token)
    await asyncio.sleep(max(0.0, int(now + 1.5) - time.time()) + 0.2)
    with pytest.raises(Unauthenticated) as err:  # the verified-token cache obeys exp
        await verifier.verify(token)
    assert err.value.reason == "TOKEN_EXPIRED"

"""The identity service's REST facade: OAuth2 token endpoint and JWKS.

``POST /oauth/token`` is the client-credentials grant of RFC 6749 §4.4: form fields
``grant_type=client_credentials``, ``client_id``, ``client_secret`` (or HTTP Basic client
authentication, §2.3.1), optional ``scope`` (space separated) and ``audience``. Errors
carry the RFC's body (``{"error": ..., "error_description": ...}``) and status;
over-limit requests get 429 with ``Retry-After``.

``GET /.well-known/jwks.json`` serves the public signing keys with ``Cache-Control``
so verifiers refetch no later than the next key change.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse

from ledgerlens.runtime.errors import (
    DomainError,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from ledgerlens.services.identity import metrics
from ledgerlens.services.identity.service import IdentityCore

__all__ = ["build_rest_router"]

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={**_NO_STORE, **(headers or {})},
    )


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    """client_id and client_secret from ``Authorization: Basic`` (RFC 6749 §2.3.1)."""
    header = request.headers.get("authorization")
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument("malformed Basic credentials", [("authorization", str(exc))]) from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidArgument("malformed Basic credentials", [("authorization", "no ':'")])
    # the RFC form-encodes both parts before Base64
    return unquote_plus(client_id), unquote_plus(secret)


def build_rest_router(core: IdentityCore) -> APIRouter:
    router = APIRouter(tags=["oauth2"])

    @router.post("/oauth/token", summary="OAuth2 client-credentials token")
    async def token(
        request: Request,
        grant_type: Annotated[str, Form()] = "",
        client_id: Annotated[str, Form()] = "",
        client_secret: Annotated[str, Form()] = "",
        scope: Annotated[str, Form()] = "",
        audience: Annotated[str, Form()] = "",
    ) -> JSONResponse:
        basic_used = False
        try:
            basic = _basic_credentials(request)
            if basic is not None:
                if client_id or client_secret:
                    raise InvalidArgument(
                        "give client credentials once: Basic auth or the form, not both",
                        [("client_id", "also given in Authorization")],
                    )
                client_id, client_secret = basic
                basic_used = True
            if grant_type != "client_credentials":
                metrics.record_token_failure(
                    "unsupported_grant_type" if grant_type else "invalid_request"
                )
                return _oauth_error(
                    400,
                    "unsupported_grant_type" if grant_type else "invalid_request",
                    "grant_type must be client_credentials",
                )
            if not client_id or not client_secret:
                metrics.record_token_failure("invalid_request")
                return _oauth_error(
                    400, "invalid_request", "client_id and client_secret are required"
                )
            address = request.client.host if request.client else ""
            issued = await core.issue_token(
                client_id, client_secret, scope.split(), audience, address
            )
        except Unauthenticated as exc:
            metrics.record_token_failure(exc)
            headers = {"WWW-Authenticate": 'Basic realm="ledgerlens"'} if basic_used else None
            return _oauth_error(401, "invalid_client", exc.message, headers)
        except ResourceExhausted as exc:
            metrics.record_token_failure(exc)
            retry = str(max(1, math.ceil(exc.retry_after or 1)))
            return _oauth_error(429, "slow_down", exc.message, {"Retry-After": retry})
        except InvalidArgument as exc:
            metrics.record_token_failure(exc)
            fields = {field for field, _ in exc.violations}
            error = (
                "invalid_scope" if "scopes" in fields or "scope" in fields else "invalid_request"
            )
            return _oauth_error(400, error, exc.message)
        except DomainError as exc:
            metrics.record_token_failure("invalid_request")
            return _oauth_error(400, "invalid_request", exc.message)
        metrics.record_token_issued("http")
        body: dict[str, Any] = {
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "scope": " ".join(issued.scopes),
        }
        return JSONResponse(body, headers=_NO_STORE)

    @router.get("/.well-known/jwks.json", summary="public signing keys (JWKS)")
    async def jwks() -> JSONResponse:
        document, max_age = await core.jwks()
        return JSONResponse(
            document, headers={"Cache-Control": f"public, max-age={max(0, int(max_age))}"}
        )

    return router

"""The Fabric CA compatible REST subset, so existing Fabric tooling can enroll here.

``build_fabric_ca_router(ca)`` serves, under ``/api/v1`` (and at the root, as Fabric
CA's own server does, since ``fabric-ca-client`` calls ``<url>/enroll``):

- ``POST enroll``: HTTP Basic auth with enrollment id and secret; body
  ``{"certificate_request": <CSR PEM>, "profile": "", "attr_reqs": [...]}``;
- ``POST revoke`` and ``POST gencrl``: authorised by a Fabric CA token;
- ``GET|POST cainfo``: the CA chain.

Responses use Fabric CA's envelope ``{"success", "result", "errors", "messages"}``,
errors its numeric codes (``lib/caerrors``): 20 authentication failure (401), 71
authorization failure (403), 31 bad CSR / 5 bad request body (400), 8/10 nothing to
revoke (404), 19 unknown CA name (404).

The token (``Authorization: <b64(cert PEM)>.<b64(signature)>``) is what Fabric CA's
``util.GenECDSAToken`` makes: an ECDSA-SHA256 signature, ASN.1 DER with low S, over

    method + "." + b64(uri) + "." + b64(body) + "." + b64(cert PEM)

where ``uri`` is the request URI as sent (path and query, e.g. ``/api/v1/revoke``),
``b64`` is standard base64 with padding, and the last part is the token's own first
part. Fabric CA's 1.3 compatibility mode (signing only ``b64(body) + "." + b64(cert)``)
is not accepted.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ledgerlens.runtime.errors import (
    DomainError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

from . import metrics
from .ca import AttributeRequest, CertificateAuthority, CertificateHolder, Role

__all__ = [
    "P256_ORDER",
    "build_fabric_ca_router",
    "create_fabric_token",
    "token_payload",
    "verify_fabric_token",
]

_log = logging.getLogger(__name__)

#: the order n of the P-256 group (SEC 2): low S means s <= n / 2.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

#: Fabric CA's error codes (lib/caerrors) used here.
ERR_UNKNOWN = 0
ERR_BAD_REQ_BODY = 5
ERR_REV_CERT_NOT_FOUND = 8
ERR_CERT_WRONG_OWNER = 9
ERR_REVOKE_ID_NOT_FOUND = 10
ERR_REVOKER_NOT_AFFILIATED = 17
ERR_CA_NOT_FOUND = 19
ERR_AUTHENTICATION_FAILURE = 20
ERR_BAD_CSR = 31
ERR_AUTHORIZATION_FAILURE = 71

MAX_BODY_BYTES = 64 * 1024


# -- tokens ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def token_payload(method: str, uri: str, body: bytes, b64cert: str) -> bytes:
    """The bytes a Fabric CA token signs (SHA-256, ECDSA)."""
    return f"{method}.{_b64(uri.encode())}.{_b64(body)}.{b64cert}".encode()


def _low_s(signature: bytes) -> bytes:
    r, s = decode_dss_signature(signature)
    if s > P256_ORDER // 2:
        s = P256_ORDER - s
    return encode_dss_signature(r, s)


def create_fabric_token(
    cert_pem: bytes, key: ec.EllipticCurvePrivateKey, method: str, uri: str, body: bytes
) -> str:
    """A Fabric CA token for one request (for clients: the CLI and tests)."""
    b64cert = _b64(cert_pem)
    signature = key.sign(token_payload(method, uri, body, b64cert), ec.ECDSA(hashes.SHA256()))
    return f"{b64cert}.{_b64(_low_s(signature))}"


def verify_fabric_token(authorization: str, method: str, uri: str, body: bytes) -> x509.Certificate:
    """The certificate a valid token was signed with; UNAUTHENTICATED otherwise.

    Checks only the signature (low S, over this very request); whether the certificate
    is trusted is :meth:`CertificateAuthority.holder_of`'s business.
    """
    parts = authorization.strip().split(".")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise Unauthenticated("authorization is not a Fabric CA token", reason="BAD_TOKEN")
    b64cert, b64sig = parts
    try:
        cert_pem = base64.b64decode(b64cert, validate=True)
        signature = base64.b64decode(b64sig, validate=True)
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except (binascii.Error, ValueError):
        raise Unauthenticated("the token's certificate is unreadable", reason="BAD_TOKEN") from None
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise Unauthenticated("the token's certificate is not ECDSA P-256", reason="BAD_TOKEN")
    try:
        _r, s = decode_dss_signature(signature)
    except ValueError:
        raise Unauthenticated("the token's signature is malformed", reason="BAD_TOKEN") from None
    if s > P256_ORDER // 2:
        # Fabric's verifiers reject the malleable twin of every signature
        raise Unauthenticated("the token's signature is not low-S", reason="BAD_TOKEN")
    try:
        public_key.verify(
            signature, token_payload(method, uri, body, b64cert), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise Unauthenticated(
            "the token's signature does not match the request", reason="BAD_TOKEN"
        ) from None
    return certificate


# -- envelope --------------------------------------------------------------------------


def _ok(result: Mapping[str, Any]) -> JSONResponse:
    return JSONResponse(
        {"success": True, "result": dict(result), "errors": [], "messages": []}, status_code=200
    )


def _fail(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "success": False,
            "result": None,
            "errors": [{"code": code, "message": message}],
            "messages": [],
        },
        status_code=status,
    )


def _error_response(
    exc: DomainError, *, not_found_code: int = ERR_REV_CERT_NOT_FOUND
) -> JSONResponse:
    if isinstance(exc, Unauthenticated):
        # the caller learns nothing about which part failed; the log does
        return _fail(401, ERR_AUTHENTICATION_FAILURE, "Authentication failure")
    if isinstance(exc, PermissionDenied):
        return _fail(403, ERR_AUTHORIZATION_FAILURE, f"Authorization failure: {exc.message}")
    if isinstance(exc, InvalidArgument):
        fields = {f for f, _ in exc.violations}
        code = ERR_BAD_CSR if "csr" in fields else ERR_BAD_REQ_BODY
        return _fail(400, code, exc.message)
    if isinstance(exc, NotFound):
        return _fail(404, not_found_code, exc.message)
    return _fail(400, ERR_UNKNOWN, exc.message)


class _RequestError(Exception):
    def __init__(self, response: JSONResponse) -> None:
        super().__init__("request refused")
        self.response = response


async def _json_body(request: Request, *, required: bool) -> tuple[bytes, dict[str, Any]]:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise _RequestError(_fail(413, ERR_BAD_REQ_BODY, "request body is too large"))
    if not body.strip():
        if required:
            raise _RequestError(_fail(400, ERR_BAD_REQ_BODY, "request body is empty"))
        return body, {}
    try:
        data = json.loads(body)
    except ValueError:
        raise _RequestError(_fail(400, ERR_BAD_REQ_BODY, "request body is not JSON")) from None
    if not isinstance(data, dict):
        raise _RequestError(_fail(400, ERR_BAD_REQ_BODY, "request body must be a JSON object"))
    return body, data


def _string(data: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _RequestError(_fail(400, ERR_BAD_REQ_BODY, f"{name} must be a string"))
        return value
    return ""


def _request_uri(request: Request) -> str:
    """The URI as the client sent it (what Go's ``r.URL.RequestURI()`` gives)."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


def _basic_credentials(request: Request) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Unauthenticated("no Basic credentials", reason="NO_USER_PASS")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed Basic credentials", reason="NO_USER_PASS") from None
    user, sep, secret = decoded.partition(":")
    if not sep or not user:
        raise Unauthenticated("malformed Basic credentials", reason="NO_USER_PASS")
    return user, secret


def _check_ca_name(ca: CertificateAuthority, data: Mapping[str, Any]) -> None:
    name = _string(data, "caname", "CAName")
    if name and name != ca.ca_name:
        raise _RequestError(_fail(404, ERR_CA_NOT_FOUND, f"CA '{name}' does not exist"))


def _attr_reqs(data: Mapping[str, Any]) -> list[AttributeRequest] | None:
    raw = data.get("attr_reqs")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _RequestError(_fail(400, ERR_BAD_REQ_BODY, "attr_reqs must be a list"))
    reqs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _RequestError(
                _fail(400, ERR_BAD_REQ_BODY, f"attr_reqs[{i}] needs a string 'name'")
            )
        reqs.append(AttributeRequest(name=item["name"], optional=bool(item.get("optional"))))
    return reqs


def _is_true(attributes: Mapping[str, str], name: str) -> bool:
    return attributes.get(name, "").strip().lower() == "true"


def _within(affiliation: str, scope: str) -> bool:
    """Whether ``affiliation`` is ``scope`` or below it (``""`` is the root)."""
    return not scope or affiliation == scope or affiliation.startswith(scope + ".")


# -- the router ------------------------------------------------------------------------


def build_fabric_ca_router(
    ca: CertificateAuthority, *, prefix: str = "/api/v1", root_aliases: bool = True
) -> APIRouter:
    """Fabric CA's enroll / revoke / gencrl / cainfo on ``prefix`` (and at the root too,
    unless ``root_aliases`` is False)."""
    router = APIRouter(tags=["fabric-ca"])

    async def authorised(request: Request, body: bytes) -> CertificateHolder:
        token = request.headers.get("authorization", "")
        certificate = verify_fabric_token(token, request.method, _request_uri(request), body)
        return await ca.holder_of(certificate)

    def server_info() -> dict[str, str]:
        info = ca.ca_info()
        return {
            "CAName": info.ca_name,
            "CAChain": _b64("".join(info.chain_pem).encode()),
            "IssuerPublicKey": "",
            "IssuerRevocationPublicKey": "",
            "Version": "ledgerlens",
        }

    async def enroll(request: Request) -> JSONResponse:
        try:
            _, data = await _json_body(request, required=True)
            _check_ca_name(ca, data)
            user, secret = _basic_credentials(request)
            issued = await ca.enroll(
                user,
                secret,
                _string(data, "certificate_request"),
                profile=_string(data, "profile"),
                attr_reqs=_attr_reqs(data),
            )
        except _RequestError as exc:
            metrics.record_ca_operation("enroll", ok=False)
            return exc.response
        except DomainError as exc:
            metrics.record_ca_operation("enroll", ok=False)
            _log.info("fabric-ca enroll refused: %s (%s)", exc.reason, exc.message)
            return _error_response(exc)
        metrics.record_ca_operation("enroll", ok=True)
        _log.info("fabric-ca enrolled %s serial %s", issued.enrollment_id, issued.serial)
        return _ok({"Cert": _b64(issued.certificate_pem.encode()), "ServerInfo": server_info()})

    async def revoke(request: Request) -> JSONResponse:
        not_found = ERR_REV_CERT_NOT_FOUND
        try:
            body, data = await _json_body(request, required=True)
            caller = await authorised(request, body)
            _check_ca_name(ca, data)
            if caller.role != Role.ADMIN and not _is_true(caller.attributes, "hf.Revoker"):
                raise PermissionDenied(
                    f"{caller.enrollment_id!r} may not revoke (needs role admin or hf.Revoker)"
                )
            enrollment_id = _string(data, "id")
            serial = _string(data, "serial")
            aki = _string(data, "aki")
            reason = _string(data, "reason")
            if serial:
                record = await ca.issued(serial)
                if record is None:
                    raise NotFound(f"certificate with serial {serial} was not found")
                if enrollment_id and record.enrollment_id != enrollment_id:
                    raise _RequestError(
                        _fail(400, ERR_CERT_WRONG_OWNER, "certificate is not owned by that id")
                    )
                target_affiliation = record.affiliation
            elif enrollment_id:
                not_found = ERR_REVOKE_ID_NOT_FOUND
                identity = await ca.get_identity(enrollment_id)
                target_affiliation = identity.affiliation if identity is not None else ""
            else:
                raise _RequestError(_fail(400, 15, "revoke needs 'id', or 'serial' (with 'aki')"))
            if not _within(target_affiliation, caller.affiliation):
                raise _RequestError(
                    _fail(
                        403,
                        ERR_REVOKER_NOT_AFFILIATED,
                        "the revoker's affiliation does not cover the target's",
                    )
                )
            result = await ca.revoke(
                serial=serial or None,
                enrollment_id=None if serial else enrollment_id,
                reason=reason,
                aki=aki or None,
                revoke_identity=not serial,
            )
            crl_b64 = ""
            if data.get("gencrl") is True:
                crl_b64 = _b64((await ca.crl()).pem.encode())
        except _RequestError as exc:
            metrics.record_ca_operation("revoke", ok=False)
            return exc.response
        except DomainError as exc:
            metrics.record_ca_operation("revoke", ok=False)
            _log.info("fabric-ca revoke refused: %s (%s)", exc.reason, exc.message)
            return _error_response(exc, not_found_code=not_found)
        metrics.record_ca_operation("revoke", ok=True)
        _log.info(
            "fabric-ca revoke by %s: %s", caller.enrollment_id, ",".join(result.revoked_serials)
        )
        return _ok(
            {
                "RevokedCerts": [{"Serial": s, "AKI": result.aki} for s in result.revoked_serials],
                "CRL": crl_b64,
            }
        )

    async def gencrl(request: Request) -> JSONResponse:
        try:
            body, data = await _json_body(request, required=False)
            caller = await authorised(request, body)
            _check_ca_name(ca, data)
            if caller.role != Role.ADMIN and not _is_true(caller.attributes, "hf.GenCRL"):
                raise PermissionDenied(
                    f"{caller.enrollment_id!r} may not generate CRLs (needs admin or hf.GenCRL)"
                )
            crl = await ca.crl()
        except _RequestError as exc:
            metrics.record_ca_operation("gencrl", ok=False)
            return exc.response
        except DomainError as exc:
            metrics.record_ca_operation("gencrl", ok=False)
            _log.info("fabric-ca gencrl refused: %s (%s)", exc.reason, exc.message)
            return _error_response(exc)
        metrics.record_ca_operation("gencrl", ok=True)
        return _ok({"CRL": _b64(crl.pem.encode())})

    async def cainfo(request: Request) -> JSONResponse:
        try:
            _, data = await _json_body(request, required=False)
            _check_ca_name(ca, data)
        except _RequestError as exc:
            return exc.response
        return _ok(server_info())

    bases = [prefix.rstrip("/")] + ([""] if root_aliases and prefix.strip("/") else [])
    for base in bases:
        where = base.strip("/").replace("/", "_") or "root"
        for name, handler, methods in (
            ("enroll", enroll, ("POST",)),
            ("revoke", revoke, ("POST",)),
            ("gencrl", gencrl, ("POST",)),
            ("cainfo", cainfo, ("GET", "POST")),
        ):
            for method in methods:
                # one route per method: OpenAPI wants an operation id of its own for each
                router.add_api_route(
                    f"{base}/{name}",
                    handler,
                    methods=[method],
                    operation_id=f"fabric_ca_{name}_{method.lower()}_{where}",
                    openapi_extra=_openapi(name) if method == "POST" else None,
                )
    return router


# The handlers read the raw body (its bytes are signed in the token), so FastAPI cannot
# infer what they take: the OpenAPI document says it here.
_STRING = {"type": "string"}
_OPENAPI_BODIES: dict[str, dict[str, Any]] = {
    "enroll": {
        "certificate_request": _STRING,
        "profile": _STRING,
        "caname": _STRING,
        "attr_reqs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": _STRING, "optional": {"type": "boolean"}},
            },
        },
    },
    "revoke": {
        "id": _STRING,
        "serial": _STRING,
        "aki": _STRING,
        "reason": _STRING,
        "caname": _STRING,
        "gencrl": {"type": "boolean"},
    },
    "gencrl": {"caname": _STRING},
    "cainfo": {"caname": _STRING},
}


def _openapi(name: str) -> dict[str, Any]:
    """The request body of a POST, and the Fabric token header (enroll, revoke and gencrl
    need it; cainfo ignores it)."""
    return {
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": _OPENAPI_BODIES[name]}
                }
            }
        },
        "parameters": [
            {
                "name": "Authorization",
                "in": "header",
                "required": False,
                "description": "Fabric CA token: base64(certificate PEM).base64(signature)",
                "schema": _STRING,
            }
        ],
    }

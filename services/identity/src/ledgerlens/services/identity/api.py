"""The identity gRPC servicer: proto <-> domain, nothing else.

Scopes are enforced by the runtime from the contract's options; what is left here is
the one rule the contract leaves to the service: acting on another tenant than the
caller's own needs the ``admin`` scope as well.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.identity.v1 import identity_pb2, identity_pb2_grpc
from ledgerlens.runtime.auth import Principal, current_principal
from ledgerlens.runtime.errors import (
    DomainError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    timestamp_field,
)
from ledgerlens.services.identity import metrics
from ledgerlens.services.identity.ca import Attribute, CertificateAuthority, Role
from ledgerlens.services.identity.keys import ApiKeyRecord, ApiKeyState
from ledgerlens.services.identity.service import IdentityCore
from ledgerlens.services.identity.tokens import TokenState

__all__ = ["IdentityApi"]

Context = grpc.aio.ServicerContext[Any, Any]

_KEY_STATES = {
    ApiKeyState.ACTIVE: identity_pb2.API_KEY_STATE_ACTIVE,
    ApiKeyState.REVOKED: identity_pb2.API_KEY_STATE_REVOKED,
    ApiKeyState.EXPIRED: identity_pb2.API_KEY_STATE_EXPIRED,
}
_TOKEN_STATES = {
    TokenState.ACTIVE: identity_pb2.TOKEN_STATE_ACTIVE,
    TokenState.EXPIRED: identity_pb2.TOKEN_STATE_EXPIRED,
    TokenState.REVOKED: identity_pb2.TOKEN_STATE_REVOKED,
    TokenState.INVALID: identity_pb2.TOKEN_STATE_INVALID,
}
_ROLES = {
    identity_pb2.CERTIFICATE_ROLE_CLIENT: Role.CLIENT,
    identity_pb2.CERTIFICATE_ROLE_PEER: Role.PEER,
    identity_pb2.CERTIFICATE_ROLE_ORDERER: Role.ORDERER,
    identity_pb2.CERTIFICATE_ROLE_ADMIN: Role.ADMIN,
}
_ALGORITHMS = {
    identity_pb2.SIGNING_ALGORITHM_UNSPECIFIED: None,
    identity_pb2.SIGNING_ALGORITHM_ES256: "ES256",
    identity_pb2.SIGNING_ALGORITHM_EDDSA: "EdDSA",
}


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _principal() -> Principal:
    principal = current_principal()
    if principal is None:  # only reachable with auth disabled (tools, some tests)
        raise Unauthenticated("this call needs a bearer token")
    return principal


def _tenant(requested: str, field: str = "tenant_id") -> str:
    """The caller's tenant, or another one for an ``admin`` caller."""
    principal = _principal()
    if not requested or requested == principal.tenant:
        return principal.tenant
    if "admin" not in principal.scopes:
        raise PermissionDenied(
            f"acting on tenant {requested!r} needs the 'admin' scope",
            reason="SCOPE_MISSING",
            metadata={"scope": "admin", "field": field},
        )
    return requested


class IdentityApi(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, core: IdentityCore, ca: CertificateAuthority) -> None:
        self.core = core
        self.ca = ca

    def _key(self, record: ApiKeyRecord) -> identity_pb2.ApiKey:
        return identity_pb2.ApiKey(
            key_id=record.key_id,
            tenant_id=record.tenant_id,
            name=record.name,
            scopes=list(record.scopes),
            state=_KEY_STATES[self.core.key_state(record)],
            created_at=_ts(record.created_at),
            expires_at=_ts(record.expires_at),
            revoked_at=_ts(record.revoked_at),
            last_used_at=_ts(record.last_used_at),
        )

    # -- API keys ------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: identity_pb2.CreateApiKeyRequest, context: Context
    ) -> identity_pb2.CreateApiKeyResponse:
        tenant = _tenant(request.tenant_id)
        expires_at = timestamp_field(request, "expires_at")
        record, secret = await self.core.create_key(
            tenant, request.name, list(request.scopes), expires_at
        )
        return identity_pb2.CreateApiKeyResponse(key=self._key(record), secret=secret)

    async def ListApiKeys(
        self, request: identity_pb2.ListApiKeysRequest, context: Context
    ) -> identity_pb2.ListApiKeysResponse:
        page = await self.core.list_keys(
            _tenant(request.tenant_id),
            include_inactive=request.include_inactive,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return identity_pb2.ListApiKeysResponse(
            keys=[self._key(k) for k in page.keys], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: identity_pb2.RevokeApiKeyRequest, context: Context
    ) -> identity_pb2.RevokeApiKeyResponse:
        if not request.key_id:
            raise InvalidArgument("key_id is required", [("key_id", "must not be empty")])
        if len(request.reason) > 256:
            raise InvalidArgument("reason is too long", [("reason", "at most 256 characters")])
        _tenant((await self.core.get_key(request.key_id)).tenant_id, field="key_id")
        record = await self.core.revoke_key(request.key_id, request.reason)
        return identity_pb2.RevokeApiKeyResponse(key=self._key(record))

    # -- tokens --------------------------------------------------------------------------

    async def IssueToken(
        self, request: identity_pb2.IssueTokenRequest, context: Context
    ) -> identity_pb2.IssueTokenResponse:
        try:
            issued = await self.core.issue_token(
                request.client_id,
                request.client_secret,
                list(request.scopes),
                request.audience,
                _client_address(context.peer()),
            )
        except DomainError as exc:
            metrics.record_token_failure(exc)
            raise
        metrics.record_token_issued("grpc")
        return identity_pb2.IssueTokenResponse(
            access_token=issued.access_token,
            token_type=issued.token_type,
            expires_in=issued.expires_in,
            scopes=list(issued.scopes),
            expires_at=_ts(issued.expires_at),
        )

    async def GetJwks(
        self, request: identity_pb2.GetJwksRequest, context: Context
    ) -> identity_pb2.GetJwksResponse:
        jwks = await self.core.jwks()
        return identity_pb2.GetJwksResponse(
            jwks_json=jwks.to_json(),
            keys=[
                identity_pb2.JsonWebKey(
                    kid=k.kid,
                    kty=k.kty,
                    crv=k.crv,
                    alg=k.alg,
                    use=k.use,
                    x=k.x,
                    y=k.y or "",
                    active=k.active,
                    retire_after=_ts(k.retire_after),
                )
                for k in jwks.keys
            ],
            max_age_seconds=int(jwks.max_age_seconds),
        )

    async def Introspect(
        self, request: identity_pb2.IntrospectRequest, context: Context
    ) -> identity_pb2.IntrospectResponse:
        found = await self.core.introspect(request.token)
        return identity_pb2.IntrospectResponse(
            active=found.active,
            state=_TOKEN_STATES[found.state],
            subject=found.subject or "",
            tenant_id=found.tenant_id or "",
            scopes=list(found.scopes),
            audience=found.audience or "",
            issuer=found.issuer or "",
            jti=found.jti or "",
            kid=found.kid or "",
            issued_at=_ts(found.issued_at),
            expires_at=_ts(found.expires_at),
        )

    async def RotateSigningKey(
        self, request: identity_pb2.RotateSigningKeyRequest, context: Context
    ) -> identity_pb2.RotateSigningKeyResponse:
        if request.algorithm not in _ALGORITHMS:
            raise InvalidArgument("unknown algorithm", [("algorithm", "ES256 or EdDSA")])
        rotated = await self.core.rotate(_ALGORITHMS[request.algorithm])  # type: ignore[arg-type]
        return identity_pb2.RotateSigningKeyResponse(
            kid=rotated.kid,
            previous_kid=rotated.previous_kid or "",
            previous_retire_after=_ts(rotated.previous_retire_after),
        )

    # -- certificates --------------------------------------------------------------------

    async def EnrollCertificate(
        self, request: identity_pb2.EnrollCertificateRequest, context: Context
    ) -> identity_pb2.EnrollCertificateResponse:
        with metrics.ca_operation("enroll"):
            _principal()
            try:
                issued = await self.ca.enroll(
                    request.enrollment_id,
                    None,  # the caller is authenticated by its token (scope certs:enroll)
                    request.csr_pem,
                    profile=request.profile,
                    role=_ROLES.get(request.role),
                    affiliation=request.affiliation or None,
                    attributes=[Attribute(a.name, a.value, ecert=True) for a in request.attributes],
                )
            except InvalidArgument as exc:  # the CA names the CSR "csr", the contract "csr_pem"
                violations = [("csr_pem" if f == "csr" else f, d) for f, d in exc.violations]
                raise InvalidArgument(exc.message, violations, reason=exc.reason) from exc
        return identity_pb2.EnrollCertificateResponse(
            certificate_pem=issued.certificate_pem,
            chain_pem=list(issued.chain_pem),
            serial=issued.serial,
            not_before=_ts(issued.not_before),
            not_after=_ts(issued.not_after),
        )

    async def RevokeCertificate(
        self, request: identity_pb2.RevokeCertificateRequest, context: Context
    ) -> identity_pb2.RevokeCertificateResponse:
        with metrics.ca_operation("revoke"):
            target = request.WhichOneof("target")
            if target is None:
                raise InvalidArgument(
                    "name the certificate to revoke", [("target", "serial or enrollment_id")]
                )
            result = await self.ca.revoke(
                serial=request.serial if target == "serial" else None,
                enrollment_id=request.enrollment_id if target == "enrollment_id" else None,
                reason=int(request.reason),
            )
        return identity_pb2.RevokeCertificateResponse(
            revoked_serials=list(result.revoked_serials), revoked_at=_ts(result.revoked_at)
        )

    async def GetCrl(
        self, request: identity_pb2.GetCrlRequest, context: Context
    ) -> identity_pb2.GetCrlResponse:
        with metrics.ca_operation("gencrl"):
            crl = await self.ca.crl()
        pem = request.format == identity_pb2.CRL_FORMAT_PEM
        return identity_pb2.GetCrlResponse(
            crl=crl.pem.encode() if pem else crl.der,
            format=identity_pb2.CRL_FORMAT_PEM if pem else identity_pb2.CRL_FORMAT_DER,
            this_update=_ts(crl.this_update),
            next_update=_ts(crl.next_update),
            crl_number=crl.crl_number,
        )

    async def GetCaInfo(
        self, request: identity_pb2.GetCaInfoRequest, context: Context
    ) -> identity_pb2.GetCaInfoResponse:
        info = self.ca.ca_info()
        return identity_pb2.GetCaInfoResponse(chain_pem=list(info.chain_pem), ca_name=info.ca_name)


def _client_address(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` / ``ipv6:[::1]:5555`` -> the address without the port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer

"""The identity commands: ``login``, ``logout``, ``token``, ``keys ...``, ``certs ...``.

Also what every other command group builds on: :class:`Session` (a fresh access token
from the cached credentials, refreshed through ``IssueToken`` when it is about to
expire), :func:`rpc_errors` (a gRPC failure becomes one line for a person) and
:func:`run` (runs a command's coroutine, reports a :class:`CliError`, exits 1).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import grpc
import grpc.aio
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console
from rich.table import Table

from ledgerlens.cli.config import REFRESH_MARGIN_SECONDS, CliConfig, CliError, Credentials
from ledgerlens.identity.v1 import identity_pb2
from ledgerlens.runtime.clients import RetryPolicy, ServiceClient, identity_client, static_token
from ledgerlens.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)

if TYPE_CHECKING:
    from ledgerlens.identity.v1.identity_pb2_grpc import IdentityServiceAsyncStub

__all__ = [
    "Session",
    "certs_app",
    "describe_rpc_error",
    "keys_app",
    "register",
    "rpc_errors",
    "run",
]

T = TypeVar("T")

#: a person waits for the answer: a few quick retries of a refused connection, no more.
CLI_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=1.0)
LOGIN_HINT = "run `ledgerlens login --client-id <key id>`"


# -- running a command -----------------------------------------------------------------


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; a :class:`CliError` is one line on stderr, exit 1."""
    try:
        return asyncio.run(main)
    except CliError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def config_of(ctx: typer.Context) -> CliConfig:
    config = ctx.find_object(CliConfig)
    return config if config is not None else CliConfig()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_rpc_error(
    error: grpc.aio.AioRpcError, service: str, target: str, *, authenticated: bool = True
) -> str:
    """One line for a person: the status code, the message, the details that help."""
    code = error.code()
    details = _one_line(error.details() or "")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{service} at {target} did not answer in time (DEADLINE_EXCEEDED: {details})"
    domain = from_rpc_error(error)
    if code == grpc.StatusCode.UNAVAILABLE and (domain is None or domain.reason == code.name):
        # a refused or unresolvable connection: no status details, just the transport's
        return f"cannot reach {service} at {target} (UNAVAILABLE: {details})"
    message = _one_line(domain.message) if domain is not None else details
    line = f"{code.name}: {message}" if message else code.name
    extra: list[str] = []
    if isinstance(domain, InvalidArgument) and domain.violations:
        extra.append("; ".join(f"{f}: {_one_line(d)}" for f, d in domain.violations))
    if isinstance(domain, FailedPrecondition) and domain.violations:
        extra.append("; ".join(f"{s}: {_one_line(d)}" for _, s, d in domain.violations))
    if isinstance(domain, ResourceExhausted | Unavailable) and domain.retry_after is not None:
        extra.append(f"retry in {domain.retry_after:.0f}s")
    if code == grpc.StatusCode.UNAUTHENTICATED and authenticated:
        extra.append(LOGIN_HINT + " again")
    if code == grpc.StatusCode.PERMISSION_DENIED and domain is not None:
        scope = domain.metadata.get("scope", "")
        if scope and scope not in line:
            extra.append(f"needs scope {scope!r}")
    if extra:
        line += " (" + "; ".join(extra) + ")"
    return line


@asynccontextmanager
async def rpc_errors(
    service: str, target: str, *, authenticated: bool = True
) -> AsyncIterator[None]:
    """Turn a gRPC failure inside the block into a :class:`CliError`."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise CliError(
            describe_rpc_error(exc, service, target, authenticated=authenticated)
        ) from exc


# -- the session: cached credentials and a fresh token ---------------------------------


def _claims(token: str) -> dict[str, Any]:
    """The JWT's claims, unverified (for display only; services verify tokens)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _expiry(issued: identity_pb2.IssueTokenResponse) -> float:
    if issued.HasField("expires_at"):
        return float(issued.expires_at.ToSeconds())
    return time.time() + issued.expires_in


class Session:
    """The identity service as the person logged in sees it."""

    def __init__(self, config: CliConfig) -> None:
        self.config = config
        self.store = config.credentials

    def client(self, token: str | None = None) -> ServiceClient[IdentityServiceAsyncStub]:
        return identity_client(
            self.config.identity_target,
            token_provider=static_token(token),
            default_timeout=self.config.timeout_seconds,
            retry=CLI_RETRY,
        )

    def errors(self, *, authenticated: bool = True) -> AbstractAsyncContextManager[None]:
        return rpc_errors("identity", self.config.identity_target, authenticated=authenticated)

    def credentials(self) -> Credentials:
        found = self.store.load()
        if found is None:
            raise CliError(f"not logged in: {LOGIN_HINT} first")
        return found

    async def issue(
        self, client_id: str, client_secret: str, scopes: list[str] | None = None
    ) -> identity_pb2.IssueTokenResponse:
        """``IssueToken`` (public: needs no token)."""
        request = identity_pb2.IssueTokenRequest(
            client_id=client_id, client_secret=client_secret, scopes=scopes or []
        )
        async with self.errors(authenticated=False), self.client() as client:
            return await client.stub.IssueToken(request)

    async def login(self, client_id: str, client_secret: str) -> Credentials:
        issued = await self.issue(client_id, client_secret)
        credentials = Credentials(
            client_id=client_id,
            client_secret=client_secret,
            access_token=issued.access_token,
            expires_at=_expiry(issued),
            scopes=list(issued.scopes),
            identity_target=self.config.identity_target,
        )
        self.store.save(credentials)
        return credentials

    async def token(self) -> str:
        """The cached token, replaced first when it expires within the margin."""
        credentials = self.credentials()
        if credentials.expires_within(REFRESH_MARGIN_SECONDS):
            try:
                credentials = await self.login(credentials.client_id, credentials.client_secret)
            except CliError as exc:
                raise CliError(f"{exc} (refreshing the cached token; {LOGIN_HINT} again)") from exc
        return credentials.access_token

    @asynccontextmanager
    async def authed(self) -> AsyncIterator[IdentityServiceAsyncStub]:
        """A stub whose calls carry a fresh token; their failures become CliErrors."""
        token = await self.token()
        async with self.errors(), self.client(token) as client:
            yield client.stub


def session_of(ctx: typer.Context) -> Session:
    return Session(config_of(ctx))


# -- formatting ------------------------------------------------------------------------


def _when(stamp: Timestamp, present: bool, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """A UTC time for a table (``-`` for an unset field)."""
    if not present:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime(fmt)


def _parse_expiry(value: str) -> datetime:
    """``2027-01-01`` or an ISO 8601 date-time; a time without zone is UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date (2027-01-01) or ISO 8601 date-time", param_hint="--expires"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


_STATE_NAMES = {
    identity_pb2.API_KEY_STATE_ACTIVE: "[green]active[/]",
    identity_pb2.API_KEY_STATE_REVOKED: "[red]revoked[/]",
    identity_pb2.API_KEY_STATE_EXPIRED: "[yellow]expired[/]",
}


# -- login / logout / token ------------------------------------------------------------


def login(
    ctx: typer.Context,
    client_id: Annotated[
        str,
        typer.Option(
            "--client-id", envvar="LEDGERLENS_CLIENT_ID", help="The API key id (llk_...)."
        ),
    ],
    client_secret: Annotated[
        str,
        typer.Option(
            "--client-secret",
            envvar="LEDGERLENS_CLIENT_SECRET",
            prompt="Client secret",
            hide_input=True,
            help="The API key secret; prompted for (hidden) when not given.",
        ),
    ],
) -> None:
    """Exchange an API key for an access token and cache both for later commands."""
    session = session_of(ctx)
    credentials = run(session.login(client_id, client_secret))
    claims = _claims(credentials.access_token)
    until = datetime.fromtimestamp(credentials.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    tenant = claims.get("tenant", "?")
    scopes = " ".join(credentials.scopes) or "-"
    typer.echo(f"Logged in as {client_id} (tenant {tenant}; scopes: {scopes}).")
    typer.echo(
        f"Token valid until {until}; refreshed automatically. Cached in {session.store.path}"
    )


def logout(ctx: typer.Context) -> None:
    """Forget the cached API key and token."""
    session = session_of(ctx)
    try:
        removed = session.store.delete()
    except CliError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("Logged out." if removed else "Not logged in.")


def token(
    ctx: typer.Context,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="Ask for a token with only these scopes (repeatable)."),
    ] = None,
) -> None:
    """Print a fresh access token and nothing else: TOKEN=$(ledgerlens token)."""
    session = session_of(ctx)

    async def main() -> str:
        if not scope:
            return await session.token()
        credentials = session.credentials()
        issued = await session.issue(credentials.client_id, credentials.client_secret, scope)
        return issued.access_token

    typer.echo(run(main()))


# -- keys ------------------------------------------------------------------------------

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="A display name, 1-100 characters.")],
    scope: Annotated[
        list[str], typer.Option("--scope", help="A scope the key may get tokens for (repeat).")
    ],
    tenant: Annotated[
        str, typer.Option("--tenant", help="Another tenant (needs the admin scope).")
    ] = "",
    expires: Annotated[
        str | None, typer.Option("--expires", help="Expiry, e.g. 2027-01-01 (UTC).")
    ] = None,
) -> None:
    """Create an API key; its secret is printed once and never again."""
    request = identity_pb2.CreateApiKeyRequest(tenant_id=tenant, name=name, scopes=scope)
    if expires is not None:
        request.expires_at.FromDatetime(_parse_expiry(expires))
    session = session_of(ctx)

    async def main() -> identity_pb2.CreateApiKeyResponse:
        async with session.authed() as stub:
            return await stub.CreateApiKey(request)

    created = run(main())
    key = created.key
    typer.echo(f"key id:  {key.key_id}")
    typer.echo(f"secret:  {created.secret}")
    typer.echo(f"tenant:  {key.tenant_id}")
    typer.echo(f"scopes:  {' '.join(key.scopes)}")
    typer.echo(f"expires: {_when(key.expires_at, key.HasField('expires_at'))}")
    typer.echo(
        "Warning: the secret is shown only this once and is not stored anywhere "
        "(identity keeps only a hash). Save it now; a lost secret means a new key.",
        err=True,
    )


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", help="Include revoked and expired keys.")
    ] = False,
    tenant: Annotated[
        str, typer.Option("--tenant", help="Another tenant (needs the admin scope).")
    ] = "",
) -> None:
    """List API keys (never their secrets), newest first."""
    session = session_of(ctx)

    async def main() -> list[identity_pb2.ApiKey]:
        keys: list[identity_pb2.ApiKey] = []
        async with session.authed() as stub:
            page_token = ""
            while True:
                page = await stub.ListApiKeys(
                    identity_pb2.ListApiKeysRequest(
                        tenant_id=tenant,
                        include_inactive=show_all,
                        page_size=500,
                        page_token=page_token,
                    )
                )
                keys.extend(page.keys)
                page_token = page.next_page_token
                if not page_token:
                    return keys

    keys = run(main())
    console = Console()
    # ids and dates never wrap; name and scopes wrap (never to nothing); a terminal too
    # narrow for every column loses "created" first
    wide = console.width >= 100
    table = Table(
        title=f"API keys of {keys[0].tenant_id}" if keys else "API keys",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("id", no_wrap=True)
    table.add_column("name", min_width=8, overflow="fold")
    table.add_column("scopes", min_width=12, overflow="fold")
    table.add_column("state", no_wrap=True)
    if wide:
        table.add_column("created", no_wrap=True)
    table.add_column("expires", no_wrap=True)
    table.add_column("last used", no_wrap=True)
    day = "%Y-%m-%d"
    for key in keys:
        created = [_when(key.created_at, key.HasField("created_at"), day)] if wide else []
        table.add_row(
            key.key_id,
            key.name,
            " ".join(key.scopes),
            _STATE_NAMES.get(key.state, "?"),
            *created,
            _when(key.expires_at, key.HasField("expires_at"), day),
            _when(key.last_used_at, key.HasField("last_used_at"), day),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key id (llk_...).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded and published).")] = "",
) -> None:
    """Revoke an API key: it can no longer get tokens."""
    session = session_of(ctx)

    async def main() -> identity_pb2.RevokeApiKeyResponse:
        async with session.authed() as stub:
            return await stub.RevokeApiKey(
                identity_pb2.RevokeApiKeyRequest(key_id=key_id, reason=reason)
            )

    key = run(main()).key
    typer.echo(f"Revoked {key.key_id} ({key.name}, tenant {key.tenant_id}).")


# -- certs -----------------------------------------------------------------------------

certs_app = typer.Typer(
    help="Enroll and revoke X.509 identities (Fabric MSP layout).", no_args_is_help=True
)


class Role(StrEnum):
    client = "client"
    peer = "peer"
    admin = "admin"
    orderer = "orderer"


_ROLES = {
    Role.client: identity_pb2.CERTIFICATE_ROLE_CLIENT,
    Role.peer: identity_pb2.CERTIFICATE_ROLE_PEER,
    Role.admin: identity_pb2.CERTIFICATE_ROLE_ADMIN,
    Role.orderer: identity_pb2.CERTIFICATE_ROLE_ORDERER,
}


class Reason(StrEnum):
    """RFC 5280 reasons, spelled as Fabric CA's ``--revoke.reason`` spells them."""

    unspecified = "unspecified"
    keycompromise = "keycompromise"
    cacompromise = "cacompromise"
    affiliationchanged = "affiliationchanged"
    superseded = "superseded"
    cessationofoperation = "cessationofoperation"
    certificatehold = "certificatehold"
    privilegewithdrawn = "privilegewithdrawn"
    aacompromise = "aacompromise"


_REASONS = {
    Reason.unspecified: identity_pb2.REVOCATION_REASON_UNSPECIFIED,
    Reason.keycompromise: identity_pb2.REVOCATION_REASON_KEY_COMPROMISE,
    Reason.cacompromise: identity_pb2.REVOCATION_REASON_CA_COMPROMISE,
    Reason.affiliationchanged: identity_pb2.REVOCATION_REASON_AFFILIATION_CHANGED,
    Reason.superseded: identity_pb2.REVOCATION_REASON_SUPERSEDED,
    Reason.cessationofoperation: identity_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION,
    Reason.certificatehold: identity_pb2.REVOCATION_REASON_CERTIFICATE_HOLD,
    Reason.privilegewithdrawn: identity_pb2.REVOCATION_REASON_PRIVILEGE_WITHDRAWN,
    Reason.aacompromise: identity_pb2.REVOCATION_REASON_AA_COMPROMISE,
}


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # an existing file keeps its mode through O_CREAT
        out.write(data)


@certs_app.command("enroll")
def certs_enroll(
    ctx: typer.Context,
    enrollment_id: Annotated[
        str, typer.Option("--id", help="The enrollment id (the certificate's CN).")
    ],
    role: Annotated[Role, typer.Option("--role", help="The identity's Fabric role.")] = Role.client,
    affiliation: Annotated[str, typer.Option("--affiliation", help="e.g. org1.department1.")] = "",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="MSP base directory (default <config dir>/msp)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing key and certificate.")
    ] = False,
) -> None:
    """Generate a P-256 key here, enroll its CSR, write DIR/<id>/{signcerts,keystore,cacerts}."""
    if not enrollment_id or "/" in enrollment_id or "\\" in enrollment_id:
        raise typer.BadParameter("must be non-empty and without '/'", param_hint="--id")
    if enrollment_id in {".", ".."}:
        raise typer.BadParameter("must not be '.' or '..'", param_hint="--id")
    session = session_of(ctx)
    msp = (out if out is not None else session.config.config_dir / "msp") / enrollment_id
    key_path = msp / "keystore" / "key.pem"
    if key_path.exists() and not force:
        typer.echo(f"error: {key_path} exists (pass --force to replace it)", err=True)
        raise typer.Exit(1)

    # The private key never leaves this machine: only the CSR (public key) is sent.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, enrollment_id)]))
        .sign(key, hashes.SHA256())
    )
    request = identity_pb2.EnrollCertificateRequest(
        enrollment_id=enrollment_id,
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
        role=_ROLES[role],
        affiliation=affiliation,
    )

    async def main() -> tuple[identity_pb2.EnrollCertificateResponse, list[str]]:
        async with session.authed() as stub:
            enrolled = await stub.EnrollCertificate(request)
            chain = list(enrolled.chain_pem)
            if not chain:
                chain = list((await stub.GetCaInfo(identity_pb2.GetCaInfoRequest())).chain_pem)
            return enrolled, chain

    enrolled, chain = run(main())
    try:
        (msp / "keystore").mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        _write(msp / "signcerts" / "cert.pem", enrolled.certificate_pem.encode())
        if chain:
            # chain: issuing CA first, root last; an MSP keeps roots and intermediates apart
            _write(msp / "cacerts" / "ca.pem", chain[-1].encode())
            if len(chain) > 1:
                _write(
                    msp / "intermediatecerts" / "ca.pem",
                    "".join(
                        pem if pem.endswith("\n") else pem + "\n" for pem in chain[:-1]
                    ).encode(),
                )
    except OSError as exc:
        typer.echo(f"error: cannot write the MSP under {msp}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    not_after = _when(enrolled.not_after, enrolled.HasField("not_after"))
    typer.echo(f"Enrolled {enrollment_id}: serial {enrolled.serial}, valid until {not_after}.")
    typer.echo(f"MSP written to {msp} (private key: {key_path}, mode 0600).")


@certs_app.command("revoke")
def certs_revoke(
    ctx: typer.Context,
    serial: Annotated[
        str | None, typer.Option("--serial", help="One certificate, by serial (hex).")
    ] = None,
    enrollment_id: Annotated[
        str | None, typer.Option("--id", help="Every certificate of this enrollment id.")
    ] = None,
    reason: Annotated[
        Reason, typer.Option("--reason", help="RFC 5280 reason.")
    ] = Reason.unspecified,
) -> None:
    """Revoke a certificate (by serial) or all of an enrollment id's; they go on the CRL."""
    if (serial is None) == (enrollment_id is None):
        raise typer.BadParameter("give exactly one of --serial and --id")
    request = identity_pb2.RevokeCertificateRequest(reason=_REASONS[reason])
    if serial is not None:
        request.serial = serial
    else:
        request.enrollment_id = enrollment_id or ""
    session = session_of(ctx)

    async def main() -> identity_pb2.RevokeCertificateResponse:
        async with session.authed() as stub:
            return await stub.RevokeCertificate(request)

    revoked = run(main())
    if revoked.revoked_serials:
        serials = ", ".join(revoked.revoked_serials)
        typer.echo(f"Revoked {len(revoked.revoked_serials)} certificate(s): {serials}.")
    else:
        typer.echo("Nothing newly revoked (already revoked).")


# -- wiring ----------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the identity commands to the ``ledgerlens`` app."""
    app.command("login")(login)
    app.command("logout")(logout)
    app.command("token")(token)
    app.add_typer(keys_app, name="keys")
    app.add_typer(certs_app, name="certs")

"""The gRPC channel to a Fabric Gateway peer (plain, TLS or mutual TLS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

__all__ = ["connect"]


def connect(
    address: str,
    *,
    tls_root_certificates: bytes | None = None,
    client_certificate: bytes | None = None,
    client_key: bytes | None = None,
    server_name_override: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` (``host:port``).

    Without ``tls_root_certificates`` the channel is plaintext (dev networks only). With
    them it is TLS, verifying the peer against those PEM roots (the peer org's TLS CA);
    adding ``client_certificate`` and ``client_key`` (PEM, issued by a TLS CA the peer
    trusts) makes it mutual TLS, as peers with ``clientAuthRequired`` demand.
    ``server_name_override`` checks the peer certificate against that host name
    instead of the address's (e.g. ``peer0.org1.example.com`` reached via a tunnel).
    ``options`` are raw gRPC channel arguments.
    """
    channel_options = list(options)
    if tls_root_certificates is None:
        if client_certificate is not None or client_key is not None:
            raise ValueError("mutual TLS needs tls_root_certificates as well")
        return grpc.aio.insecure_channel(address, options=channel_options)
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_certificate and client_key")
    if server_name_override:
        channel_options.append(("grpc.ssl_target_name_override", server_name_override))
        channel_options.append(("grpc.default_authority", server_name_override))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_root_certificates,
        private_key=client_key,
        certificate_chain=client_certificate,
    )
    return grpc.aio.secure_channel(address, credentials, options=channel_options)

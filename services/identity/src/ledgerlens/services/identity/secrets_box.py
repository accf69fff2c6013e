"""Encryption at rest of signing private keys, with a key-encryption key (KEK) from a file.

The KEK is 32 random bytes, base64url in a file (as a Kubernetes Secret mounts it). When
no file is configured, one is created under ``data_dir`` with mode 0600 (dev / ``make up``).

Two independent subkeys are derived from the KEK with HKDF (different ``info``), so the
KEK itself never keys two algorithms:

- an AES-256-GCM key that encrypts signing private keys (AAD binds a ciphertext to its
  ``kid``, so rows cannot be swapped);
- the API-key pepper: an HMAC key for API-key secret hashes (see ``keys.py``), so a
  stolen database alone cannot confirm a guessed secret.

Changing the KEK makes existing signing keys undecryptable (rotate afterwards) and
existing API keys unusable (the pepper changes with it).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KEK_FILE_NAME", "SecretsBox", "SecretsBoxError", "load_or_create_kek"]

#: the KEK file created under ``data_dir`` when no file is configured.
KEK_FILE_NAME = "identity-kek.b64"
_KEK_BYTES = 32
_NONCE_BYTES = 12
_FORMAT_V1 = b"\x01"


class SecretsBoxError(Exception):
    """A ciphertext does not decrypt (wrong KEK, tampered or swapped row)."""


def _decode_kek(text: str, source: str) -> bytes:
    raw = text.strip()
    try:
        kek = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"key-encryption key in {source} is not base64url") from exc
    if len(kek) != _KEK_BYTES:
        raise ValueError(f"key-encryption key in {source} must be {_KEK_BYTES} bytes")
    return kek


def load_or_create_kek(key_file: str | None, data_dir: str) -> bytes:
    """The KEK from ``key_file``; without one, from (or newly created in) ``data_dir``."""
    if key_file:
        path = Path(key_file)
        return _decode_kek(path.read_text(encoding="ascii"), str(path))
    path = Path(data_dir) / KEK_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = base64.urlsafe_b64encode(secrets.token_bytes(_KEK_BYTES)).rstrip(b"=")
    try:
        # O_EXCL: two processes starting together never overwrite each other's key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _decode_kek(path.read_text(encoding="ascii"), str(path))
    with os.fdopen(fd, "wb") as f:
        f.write(encoded + b"\n")
    return _decode_kek(encoded.decode("ascii"), str(path))


def _derive(kek: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(kek)


class SecretsBox:
    """AES-256-GCM with a key derived from the KEK; also hands out the API-key pepper."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != _KEK_BYTES:
            raise ValueError(f"the key-encryption key must be {_KEK_BYTES} bytes")
        self._aead = AESGCM(_derive(kek, b"ledgerlens identity: signing-key encryption v1"))
        self.api_key_pepper = _derive(kek, b"ledgerlens identity: api-key pepper v1")

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _FORMAT_V1 + nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def decrypt(self, blob: bytes, associated_data: bytes) -> bytes:
        if blob[:1] != _FORMAT_V1 or len(blob) < 1 + _NONCE_BYTES + 16:
            raise SecretsBoxError("unknown ciphertext format")
        nonce, ciphertext = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, ciphertext, associated_data)
        except InvalidTag as exc:
            raise SecretsBoxError(
                "ciphertext does not decrypt: wrong key-encryption key or tampered data"
            ) from exc

"""Where the CLI talks to, and the credentials ``ledgerlens login`` caches.

The credentials file holds the API key's id and secret (to get a new token when the
cached one expires) and the current token, so it is written with mode 0600 in a
directory of mode 0700, atomically (a crash never leaves half a file).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "CONFIG_DIR_ENV",
    "CREDENTIALS_FILE",
    "DEFAULT_IDENTITY_TARGET",
    "DEFAULT_IDENTITY_URL",
    "DEFAULT_INFERENCE_TARGET",
    "DEFAULT_INGESTION_TARGET",
    "DEFAULT_LEDGER_TARGET",
    "DEFAULT_RETRIEVAL_TARGET",
    "IDENTITY_TARGET_ENV",
    "IDENTITY_URL_ENV",
    "INFERENCE_TARGET_ENV",
    "INGESTION_TARGET_ENV",
    "LEDGER_TARGET_ENV",
    "REFRESH_MARGIN_SECONDS",
    "RETRIEVAL_TARGET_ENV",
    "CliConfig",
    "CliError",
    "CredentialStore",
    "Credentials",
    "UsageProblem",
    "default_config_dir",
]

IDENTITY_TARGET_ENV = "LEDGERLENS_IDENTITY_TARGET"
IDENTITY_URL_ENV = "LEDGERLENS_IDENTITY_URL"
INGESTION_TARGET_ENV = "LEDGERLENS_INGESTION_TARGET"
RETRIEVAL_TARGET_ENV = "LEDGERLENS_RETRIEVAL_TARGET"
LEDGER_TARGET_ENV = "LEDGERLENS_LEDGER_TARGET"
INFERENCE_TARGET_ENV = "LEDGERLENS_INFERENCE_TARGET"
CONFIG_DIR_ENV = "LEDGERLENS_CONFIG_DIR"
DEFAULT_IDENTITY_TARGET = "127.0.0.1:50051"
DEFAULT_IDENTITY_URL = "http://127.0.0.1:8081"
DEFAULT_INGESTION_TARGET = "127.0.0.1:50052"
DEFAULT_RETRIEVAL_TARGET = "127.0.0.1:50053"
DEFAULT_LEDGER_TARGET = "127.0.0.1:50055"
DEFAULT_INFERENCE_TARGET = "127.0.0.1:50054"
CREDENTIALS_FILE = "credentials.json"
#: a cached token this close to its expiry (seconds) is replaced before it is used,
#: so it cannot expire between being read here and being checked by a service.
REFRESH_MARGIN_SECONDS = 30.0


class CliError(Exception):
    """A failure to report to the person as one line on stderr (exit code 1)."""


class UsageProblem(CliError):
    """The invocation's failure rather than a document's (nothing to ingest, no service):
    one line on stderr and exit code 2."""


def default_config_dir() -> Path:
    """``$XDG_CONFIG_HOME/ledgerlens``, i.e. ``~/.config/ledgerlens`` by default."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ledgerlens"


@dataclass(frozen=True)
class CliConfig:
    """The global options of one ``ledgerlens`` invocation."""

    identity_target: str = DEFAULT_IDENTITY_TARGET
    identity_url: str = DEFAULT_IDENTITY_URL
    ingestion_target: str = DEFAULT_INGESTION_TARGET
    retrieval_target: str = DEFAULT_RETRIEVAL_TARGET
    ledger_target: str = DEFAULT_LEDGER_TARGET
    inference_target: str = DEFAULT_INFERENCE_TARGET
    config_dir: Path = field(default_factory=default_config_dir)
    timeout_seconds: float = 10.0

    @property
    def credentials(self) -> CredentialStore:
        return CredentialStore(self.config_dir / CREDENTIALS_FILE)


@dataclass
class Credentials:
    """What ``login`` caches: the API key and its current access token."""

    client_id: str
    client_secret: str
    access_token: str
    #: the token's expiry, seconds since the epoch.
    expires_at: float
    scopes: list[str] = field(default_factory=list)
    #: the identity service the token came from (for people reading the file).
    identity_target: str = ""

    def expires_within(self, seconds: float, now: float | None = None) -> bool:
        return self.expires_at - (time.time() if now is None else now) <= seconds


class CredentialStore:
    """The credentials file: read, written 0600 atomically, removed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Credentials | None:
        """The cached credentials, or ``None`` when nobody logged in."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CliError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(raw)
            return Credentials(
                client_id=str(data["client_id"]),
                client_secret=str(data["client_secret"]),
                access_token=str(data["access_token"]),
                expires_at=float(data["expires_at"]),
                scopes=[str(s) for s in data.get("scopes", [])],
                identity_target=str(data.get("identity_target", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(
                f"{self.path} is not a ledgerlens credentials file; run `ledgerlens login` again"
            ) from exc

    def save(self, credentials: Credentials) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkstemp creates the file 0600; the replace makes the write all-or-nothing.
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".credentials-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(asdict(credentials), out, indent=2)
                    out.write("\n")
                os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise CliError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def delete(self) -> bool:
        """Remove the file; whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CliError(f"cannot remove {self.path}: {exc.strerror or exc}") from exc
        return True

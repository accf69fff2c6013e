"""``ledgerlens ingest PATH...``: stream local documents into the ingestion service.

Every file goes through one ``IngestStream`` call. At most ``--concurrency`` documents
are in flight (sent, not yet answered): that bounds what this process holds (a file is
read only when a slot frees up, so a corpus of any size streams in constant memory)
while keeping enough documents at the service to fill its embedding batches.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote, urlsplit

import grpc
import grpc.aio
import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ledgerlens.cli.config import CliError, UsageProblem
from ledgerlens.cli.identity import Session, config_of, describe_rpc_error
from ledgerlens.cli.output import exit_codes
from ledgerlens.common.v1 import common_pb2
from ledgerlens.ingestion.v1 import ingestion_pb2
from ledgerlens.runtime.clients import ingestion_client, static_token
from ledgerlens.runtime.errors import from_rpc_error

if TYPE_CHECKING:
    from ledgerlens.ingestion.v1.ingestion_pb2_grpc import IngestionServiceAsyncStub

__all__ = [
    "DOC_TYPES",
    "MAX_MESSAGE_BYTES",
    "SUPPORTED_SUFFIXES",
    "DocType",
    "Failure",
    "SourceFile",
    "Tally",
    "UsageProblem",
    "discover",
    "ingest",
    "is_unreachable",
    "print_summary",
    "register",
    "rpc_failure",
    "stream_files",
]

SUPPORTED_SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf")
#: the channel's largest message, as the service's default ``max_message_bytes``.
MAX_MESSAGE_BYTES = 24 * 1024 * 1024
#: a request's source URL and metadata must fit next to its content in one message; a
#: file too big for that is refused here, since on the wire it would end the whole stream.
_ENVELOPE_BYTES = 64 * 1024
MAX_CONTENT_BYTES = MAX_MESSAGE_BYTES - _ENVELOPE_BYTES
MAX_CORRELATION_ID_CHARS = 128
DEFAULT_CONCURRENCY = 16
SERVICE = "ingestion"
#: the code column of a file this machine could not read (no RPC was involved).
UNREADABLE = "UNREADABLE"

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class DocType(StrEnum):
    """``DocumentMetadata.doc_type``, spelled as the ingestion service spells it."""

    whitepaper = "whitepaper"
    eip = "eip"
    github = "github"
    forum = "forum"
    onchain_event = "onchain_event"
    other = "other"


DOC_TYPES = {
    DocType.whitepaper: common_pb2.DOC_TYPE_WHITEPAPER,
    DocType.eip: common_pb2.DOC_TYPE_EIP,
    DocType.github: common_pb2.DOC_TYPE_GITHUB,
    DocType.forum: common_pb2.DOC_TYPE_FORUM,
    DocType.onchain_event: common_pb2.DOC_TYPE_ONCHAIN_EVENT,
    DocType.other: common_pb2.DOC_TYPE_OTHER,
}


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file to ingest: where it is here and the URL it is known by."""

    path: Path
    source_url: str

    @property
    def display(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class Failure:
    path: str
    code: str
    field: str
    message: str


@dataclass
class Tally:
    """What a run did, kept up to date as results stream in."""

    total: int
    skipped: int = 0
    ingested: int = 0
    new_version: int = 0
    unchanged: int = 0
    #: chunks stored by this run (an unchanged document stores none).
    chunks: int = 0
    failures: list[Failure] = field(default_factory=list)
    #: directories that could not be listed (their files are in no count).
    unlisted: list[Failure] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    #: why the stream ended before every document had its result (one line), if it did.
    aborted: str | None = None

    @property
    def done(self) -> int:
        return self.ingested + self.new_version + self.unchanged + len(self.failures)

    def record(self, response: ingestion_pb2.IngestStreamResponse, path: str) -> None:
        if response.WhichOneof("outcome") == "result":
            result = response.result
            if result.status == ingestion_pb2.INGEST_STATUS_UNCHANGED:
                self.unchanged += 1
                return
            if result.status == ingestion_pb2.INGEST_STATUS_NEW_VERSION:
                self.new_version += 1
            else:
                self.ingested += 1
            self.chunks += result.chunk_count
            return
        error = response.error
        code = _CODE_NAMES.get(error.code, str(error.code))
        self.failures.append(Failure(path, code, error.field, " ".join(error.message.split())))


# -- finding the files -----------------------------------------------------------------


def _source_url(path: Path, relative: Path, prefix: str | None) -> str:
    if prefix is None:
        # abspath, not resolve: the URL names the path the person gave, not a link's target
        return Path(os.path.abspath(path)).as_uri()
    return prefix.rstrip("/") + "/" + quote(relative.as_posix())


def _listing_failure(error: OSError) -> Failure:
    where = error.filename if error.filename is not None else "?"
    return Failure(str(where), UNREADABLE, "", f"cannot list directory: {error.strerror or error}")


def discover(
    paths: Sequence[Path], *, recursive: bool = True, source_prefix: str | None = None
) -> tuple[list[SourceFile], int, list[Failure]]:
    """The supported files under ``paths`` (each once, in a stable order), how many
    other files were skipped, and the directories that could not be listed."""
    found: list[SourceFile] = []
    seen: set[str] = set()
    problems: list[Failure] = []
    skipped = 0

    def unlisted(error: OSError) -> None:
        problems.append(_listing_failure(error))

    def add(path: Path, relative: Path) -> None:
        nonlocal skipped
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            skipped += 1
            return
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            found.append(SourceFile(path, _source_url(path, relative, source_prefix)))

    for given in paths:
        if given.is_dir():
            if recursive:
                # os.walk skips a directory it cannot list; onerror makes that visible
                for root, dirs, files in os.walk(given, onerror=unlisted):
                    dirs.sort()
                    for name in sorted(files):
                        path = Path(root, name)
                        add(path, path.relative_to(given))
            else:
                try:
                    children = sorted(given.iterdir())
                except OSError as exc:
                    problems.append(_listing_failure(exc))
                    continue
                for child in children:
                    if not child.is_dir():
                        add(child, child.relative_to(given))
        elif given.exists() or given.is_symlink():
            add(given, Path(given.name))
        else:
            raise UsageProblem(f"no such file or directory: {given}")
    return found, skipped, problems


# -- streaming -------------------------------------------------------------------------


class _Unsendable(Exception):
    def __init__(self, failure_code: str, field_name: str, message: str) -> None:
        super().__init__(message)
        self.failure_code = failure_code
        self.field_name = field_name
        self.message = message


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as source:
            # one byte over the limit is enough to know it is too big, and no more is read
            content = source.read(MAX_CONTENT_BYTES + 1)
    except OSError as exc:
        raise _Unsendable(UNREADABLE, "", f"cannot read file: {exc.strerror or exc}") from exc
    if len(content) > MAX_CONTENT_BYTES:
        raise _Unsendable(
            "INVALID_ARGUMENT",
            "content",
            f"file is over the {MAX_CONTENT_BYTES}-byte limit of one "
            f"{MAX_MESSAGE_BYTES // (1024 * 1024)} MiB message; not sent",
        )
    return content


def _correlation_id(item: SourceFile, index: int) -> str:
    display = item.display
    if len(display) <= MAX_CORRELATION_ID_CHARS:
        return display
    # a path too long for the contract: the index keeps it unique, the tail recognisable
    prefix = f"#{index} ..."
    return prefix + display[-(MAX_CORRELATION_ID_CHARS - len(prefix)) :]


def is_unreachable(error: grpc.aio.AioRpcError) -> bool:
    """A connection that never came up (as opposed to a service refusing the call)."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    domain = from_rpc_error(error)
    return domain is None or domain.reason == error.code().name


def rpc_failure(error: grpc.aio.AioRpcError, service: str, target: str) -> CliError:
    """A failed call as the CLI's error: a service that cannot be reached is the
    invocation's problem (exit 2), a refusal the command's (exit 1)."""
    line = describe_rpc_error(error, service, target)
    return UsageProblem(line) if is_unreachable(error) else CliError(line)


async def stream_files(
    stub: IngestionServiceAsyncStub,
    files: Sequence[SourceFile],
    metadata: common_pb2.DocumentMetadata,
    tally: Tally,
    *,
    target: str,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_progress: Callable[[], None] = lambda: None,
) -> None:
    """Send ``files`` through one ``IngestStream`` call, recording results in ``tally``.

    Raises :class:`UsageProblem` when the service cannot be reached; any other failure
    of the stream itself is recorded in ``tally.aborted``.
    """
    window = asyncio.Semaphore(concurrency)
    in_flight: dict[str, SourceFile] = {}
    received = 0

    async def requests() -> AsyncIterator[ingestion_pb2.IngestStreamRequest]:
        for index, item in enumerate(files):
            await window.acquire()
            try:
                content = await asyncio.to_thread(_read, item.path)
            except _Unsendable as exc:
                window.release()
                tally.failures.append(
                    Failure(item.display, exc.failure_code, exc.field_name, exc.message)
                )
                on_progress()
                continue
            cid = _correlation_id(item, index)
            in_flight[cid] = item
            yield ingestion_pb2.IngestStreamRequest(
                correlation_id=cid,
                document=ingestion_pb2.IngestDocumentRequest(
                    source_url=item.source_url, content=content, metadata=metadata
                ),
            )

    call = stub.IngestStream(requests())
    try:
        async for response in call:
            received += 1
            window.release()
            item = in_flight.pop(response.correlation_id, None)
            tally.record(response, item.display if item else response.correlation_id)
            on_progress()
    except grpc.aio.AioRpcError as exc:
        line = describe_rpc_error(exc, SERVICE, target)
        if received == 0 and is_unreachable(exc):
            raise UsageProblem(line) from exc
        tally.aborted = line
        return
    for item in in_flight.values():
        tally.failures.append(
            Failure(item.display, "UNKNOWN", "", "the stream ended without this file's result")
        )


# -- output ----------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """Documents per second since the start (rich's own speed column is for bytes)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.1f} docs/s", style="progress.data.speed")


def _progress(total: int) -> tuple[Progress, Callable[[Tally], None]]:
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        # redirected output gets the summary only, not a bar redrawn into a log
        disable=not console.is_terminal,
    )
    task = progress.add_task("ingesting", total=total)

    def update(tally: Tally) -> None:
        failed = len(tally.failures)
        description = f"ingesting ([red]{failed} failed[/])" if failed else "ingesting"
        progress.update(task, completed=tally.done, description=description)

    return progress, update


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f}" if seconds > 0 else "-"


def print_summary(console: Console, tally: Tally) -> None:
    failed = len(tally.failures)
    seconds = tally.elapsed_seconds
    summary = Table(
        title="Ingestion summary",
        title_justify="left",
        box=box.SIMPLE,
        show_header=False,
        pad_edge=False,
    )
    summary.add_column("what", no_wrap=True)
    summary.add_column("value", justify="right", no_wrap=True)
    summary.add_row("documents", str(tally.total))
    summary.add_row("ingested", str(tally.ingested))
    summary.add_row("new version", str(tally.new_version))
    summary.add_row("unchanged", str(tally.unchanged))
    summary.add_row("failed", f"[red]{failed}[/]" if failed else "0")
    if tally.aborted is not None:
        summary.add_row("not processed", str(tally.total - tally.done))
    summary.add_row("skipped", str(tally.skipped))
    if tally.unlisted:
        summary.add_row("unlisted directories", f"[red]{len(tally.unlisted)}[/]")
    summary.add_row("chunks", str(tally.chunks))
    summary.add_row("elapsed", f"{seconds:.1f} s")
    summary.add_row(
        "throughput",
        f"{_rate(tally.done, seconds)} docs/s, {_rate(tally.chunks, seconds)} chunks/s",
    )
    console.print(summary)
    if not tally.failures and not tally.unlisted:
        return
    failures = Table(title="Failures", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    failures.add_column("path", overflow="fold")
    failures.add_column("code", no_wrap=True)
    failures.add_column("field", no_wrap=True)
    failures.add_column("message", overflow="fold")
    for failure in [*tally.unlisted, *sorted(tally.failures, key=lambda f: f.path)]:
        failures.add_row(failure.path, failure.code, failure.field or "-", failure.message)
    console.print(failures)


# -- the command -----------------------------------------------------------------------


def _check_prefix(prefix: str | None) -> None:
    if prefix is None:
        return
    parts = urlsplit(prefix)
    if parts.scheme.lower() not in {"http", "https", "file", "ipfs"} or not (
        parts.netloc or parts.path
    ):
        raise typer.BadParameter(
            "must be an absolute http(s), file or ipfs URL", param_hint="--source-prefix"
        )


async def _ingest(
    session: Session,
    files: list[SourceFile],
    metadata: common_pb2.DocumentMetadata,
    tally: Tally,
    concurrency: int,
) -> None:
    token = await session.token()
    target = session.config.ingestion_target
    progress, update = _progress(tally.total)
    started = time.monotonic()
    try:
        with progress:
            async with ingestion_client(
                target,
                token_provider=static_token(token),
                # a corpus takes as long as it takes; keepalive notices a dead peer
                stream_timeout=None,
                retry=None,
                max_message_bytes=MAX_MESSAGE_BYTES,
            ) as client:
                await stream_files(
                    client.stub,
                    files,
                    metadata,
                    tally,
                    target=target,
                    concurrency=concurrency,
                    on_progress=lambda: update(tally),
                )
    finally:
        tally.elapsed_seconds = time.monotonic() - started


def ingest(
    ctx: typer.Context,
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Files or directories (.md .markdown .txt .html .htm .pdf; others are skipped).",
            metavar="PATH",
            show_default=False,
        ),
    ],
    recursive: Annotated[
        bool,
        typer.Option("--recursive/--no-recursive", help="Descend into subdirectories."),
    ] = True,
    source_prefix: Annotated[
        str | None,
        typer.Option(
            "--source-prefix",
            help="Source URL = this + the path relative to the directory given "
            "(default: file://<absolute path>).",
        ),
    ] = None,
    doc_type: Annotated[
        DocType | None,
        typer.Option("--doc-type", help="The documents' type (default: inferred by the service)."),
    ] = None,
    chain: Annotated[
        str, typer.Option("--chain", help="The chain they are about, e.g. ethereum.")
    ] = "",
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="A tag (repeatable); replaces front-matter tags."),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", min=1, max=256, help="Documents in flight (sent, not yet answered)."
        ),
    ] = DEFAULT_CONCURRENCY,
) -> None:
    """Ingest documents through one stream; exit 1 if any failed, 2 if none could be sent."""
    _check_prefix(source_prefix)
    metadata = common_pb2.DocumentMetadata(
        doc_type=DOC_TYPES[doc_type] if doc_type is not None else common_pb2.DOC_TYPE_UNSPECIFIED,
        chain=chain,
        tags=tag or [],
    )
    with exit_codes():
        files, skipped, problems = discover(paths, recursive=recursive, source_prefix=source_prefix)
        if not files:
            listed = f"; {len(problems)} director(ies) unreadable" if problems else ""
            raise UsageProblem(
                f"no files to ingest ({skipped} skipped{listed}; "
                f"supported: {' '.join(SUPPORTED_SUFFIXES)})"
            )
        tally = Tally(total=len(files), skipped=skipped, unlisted=problems)
        asyncio.run(_ingest(Session(config_of(ctx)), files, metadata, tally, concurrency))

    if tally.done or tally.aborted is None:
        print_summary(Console(), tally)
    if tally.aborted is not None:
        left = tally.total - tally.done
        if tally.done:
            typer.echo(
                f"error: the stream ended early ({left} of {tally.total} document(s) not "
                f"processed): {tally.aborted}",
                err=True,
            )
        else:
            typer.echo(f"error: {tally.aborted}", err=True)
        raise typer.Exit(1)
    if tally.failures or tally.unlisted:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``ingest`` to the ``ledgerlens`` app."""
    app.command("ingest")(ingest)

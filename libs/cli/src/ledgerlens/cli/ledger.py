"""``ledgerlens verify FILE`` and ``ledgerlens ledger events``: the ledger for people.

``verify`` answers "was this content anchored, and where?" with one
``LedgerService.VerifyDocument`` call. What it hashes matters: ingestion anchors the
sha256 of a document's *normalised text* (UTF-8, LF line ends, Unicode NFC, no BOM;
for HTML and PDF the text it extracts), not of the file it was given. That
normalisation lives in ``ledgerlens.services.ingestion.documents``, which the CLI
does not depend on (it would pull in trafilatura, pypdf and markdown-it), so
``verify`` hashes the file's bytes. The two are the same for a UTF-8 Markdown or
text file with LF line ends, in NFC and without a BOM (every EIP); for any other
file ``verify`` says on stderr why its answer may be "not anchored" although the
document was ingested.

Exit codes of ``verify`` are grep's: 0 anchored, 1 not anchored (a normal answer),
2 when it could not answer (a usage error, an unreadable file, no service, a refusal).

``ledger events`` streams chaincode events (``StreamEvents``) as one line each and
ends with the checkpoint to resume after. The stream has no end-of-history marker,
so without ``--follow`` "caught up" means quiet: the command stops once no event has
arrived for ``--idle`` seconds (default 2).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import grpc
import grpc.aio
import typer
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ledgerlens.cli.config import CliError
from ledgerlens.cli.identity import CLI_RETRY, Session, config_of, describe_rpc_error
from ledgerlens.cli.ingest import UsageProblem, rpc_failure
from ledgerlens.cli.output import exit_codes
from ledgerlens.ledger.v1 import ledger_pb2
from ledgerlens.runtime.clients import ledger_client, static_token

__all__ = [
    "DEFAULT_IDLE_SECONDS",
    "EventsRun",
    "FileDigest",
    "format_checkpoint",
    "hash_file",
    "ledger_app",
    "parse_checkpoint",
    "payload_summary",
    "register",
    "stream_events",
    "verify",
]

SERVICE = "ledger"
#: without --follow, the stream is taken to be caught up after this long without an event.
DEFAULT_IDLE_SECONDS = 2.0
_READ_BLOCK = 1024 * 1024
_SHORT_SHA = 12
_SUMMARY_CHARS = 100
_MAX_BLOCK = 2**64 - 1
_TEXT_SUFFIXES = frozenset({".md", ".markdown", ".txt"})
_EXTRACTED_SUFFIXES = {".html": "HTML", ".htm": "HTML", ".pdf": "PDF"}
_UTF8_BOM = b"\xef\xbb\xbf"

# exit codes
_EXIT_NOT_ANCHORED = 1
_EXIT_TROUBLE = 2


# -- errors ----------------------------------------------------------------------------


# -- verify: the file's digest -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileDigest:
    """The sha256 of a file's bytes, and why it may differ from what ingestion anchored."""

    path: Path
    sha256: str
    size: int
    #: empty when the bytes are their own normalised text (as far as this can tell).
    caveat: str = ""


def _text_caveat(path: Path) -> str:
    """Why a text file's bytes are not ingestion's normalised text, or ``""``."""
    raw = path.read_bytes()
    problems: list[str] = []
    if raw.startswith(_UTF8_BOM):
        problems.append("a UTF-8 byte order mark")
    if b"\r" in raw:
        problems.append("CR line ends")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        problems.append("bytes that are not UTF-8")
    else:
        if not unicodedata.is_normalized("NFC", text):
            problems.append("text not in Unicode NFC")
    if not problems:
        return ""
    return (
        f"{path} has {', '.join(problems)}: ingestion anchors the sha256 of the normalised "
        "text (UTF-8, LF, NFC, no BOM), so this hash of the file's bytes will not match it"
    )


def hash_file(path: Path) -> FileDigest:
    """The sha256 of ``path``'s bytes (read in blocks); :class:`UsageProblem` when it
    cannot be read."""
    digest = hashlib.sha256()
    size = 0
    try:
        if path.is_dir():
            raise UsageProblem(f"{path} is a directory, not a file")
        with path.open("rb") as source:
            while block := source.read(_READ_BLOCK):
                digest.update(block)
                size += len(block)
        suffix = path.suffix.lower()
        if suffix in _TEXT_SUFFIXES:
            caveat = _text_caveat(path)
        elif suffix in _EXTRACTED_SUFFIXES:
            caveat = (
                f"{path} is {_EXTRACTED_SUFFIXES[suffix]}: ingestion anchors the sha256 of the "
                "text it extracts from it, so this hash of the file's bytes will not match it"
            )
        else:
            caveat = ""
    except FileNotFoundError:
        raise UsageProblem(f"no such file: {path}") from None
    except OSError as exc:
        raise UsageProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    return FileDigest(path, digest.hexdigest(), size, caveat)


# -- verify: the call and its output ------------------------------------------------------


async def _verify(
    session: Session, request: ledger_pb2.VerifyDocumentRequest
) -> ledger_pb2.VerifyDocumentResponse:
    target = session.config.ledger_target
    token = await session.token()
    async with ledger_client(
        target,
        token_provider=static_token(token),
        default_timeout=session.config.timeout_seconds,
        retry=CLI_RETRY,
    ) as client:
        try:
            response: ledger_pb2.VerifyDocumentResponse = await client.stub.VerifyDocument(request)
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc, SERVICE, target) from exc
    return response


def _when(stamp: Timestamp, present: bool) -> str:
    if not present:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_verdict(
    console: Console,
    digest: FileDigest,
    response: ledger_pb2.VerifyDocumentResponse,
    request: ledger_pb2.VerifyDocumentRequest,
) -> None:
    scope = ""
    if request.document_id:
        scope = f" as document {request.document_id}"
        if request.version:
            scope += f" version {request.version}"
    elif request.version:
        scope = f" as version {request.version}"
    if not response.anchored:
        console.print(
            Text(
                f"NOT ANCHORED: {digest.path}: the sha256 of its bytes, {digest.sha256}, "
                f"is not anchored{scope}."
            )
        )
        return
    count = len(response.records)
    console.print(
        Text(
            f"ANCHORED: {digest.path}: the sha256 of its bytes, {digest.sha256}, is anchored"
            f"{scope} ({count} record{'s' if count != 1 else ''}, oldest first)."
        )
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("document", overflow="fold")
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("tx id", no_wrap=True)
    table.add_column("block", justify="right", no_wrap=True)
    table.add_column("committed", no_wrap=True)
    table.add_column("channel", no_wrap=True)
    table.add_column("source", overflow="fold")
    for record in response.records:
        anchor = record.anchor
        table.add_row(
            Text(record.document_id),
            str(record.version),
            anchor.tx_id or "-",
            str(anchor.block_number),
            _when(anchor.committed_at, anchor.HasField("committed_at")),
            Text(anchor.channel or "-"),
            Text(record.source_url or "-"),
        )
    console.print(table)


def verify(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(help="The file to check.", metavar="FILE", show_default=False),
    ],
    document_id: Annotated[
        str, typer.Option("--document-id", help="Only this document (default: any).")
    ] = "",
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, help="Only this version (>= 1; default: any)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the answer as JSON instead of a table.")
    ] = False,
) -> None:
    """Say whether FILE's content is anchored on the ledger, and where (document,
    version, tx id, block, commit time, channel).

    It checks the sha256 of the file's BYTES. Ingestion anchors the sha256 of a
    document's normalised text (UTF-8, LF line ends, NFC, no BOM; for HTML and PDF the
    extracted text): the two agree for a UTF-8 Markdown or text file with LF line ends,
    in NFC and without a BOM (e.g. every EIP). For any other file a note on stderr says
    why they may differ.

    Exit 0 anchored, 1 not anchored, 2 on a usage error or when it cannot tell (file
    unreadable, ledger unreachable, not logged in, refused).
    """
    try:
        digest = hash_file(file)
        request = ledger_pb2.VerifyDocumentRequest(
            sha256=digest.sha256, document_id=document_id, version=version or 0
        )
        response = asyncio.run(_verify(Session(config_of(ctx)), request))
    except CliError as exc:  # UsageProblem included: either way there is no answer
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(_EXIT_TROUBLE) from None
    if digest.caveat and not response.anchored:
        typer.echo(f"note: {digest.caveat}", err=True)
    if as_json:
        answer: dict[str, Any] = {
            "file": str(file),
            "sha256": digest.sha256,
            "hashed": "file bytes",
            **json_format.MessageToDict(response, always_print_fields_with_no_presence=True),
        }
        if digest.caveat:
            answer["caveat"] = digest.caveat
        typer.echo(json.dumps(answer, indent=2))
    else:
        _print_verdict(Console(), digest, response, request)
    if not response.anchored:
        raise typer.Exit(_EXIT_NOT_ANCHORED)


# -- ledger events ---------------------------------------------------------------------

ledger_app = typer.Typer(
    help="The ledger: chaincode events (see also `ledgerlens verify`).", no_args_is_help=True
)

_CHECKPOINT = re.compile(r"^(\d+)(?::([0-9A-Za-z_-]*))?$")


def parse_checkpoint(value: str) -> ledger_pb2.Checkpoint:
    """``BLOCK:TXID`` (after that transaction) or ``BLOCK`` / ``BLOCK:`` (after the whole
    block); :class:`UsageProblem` otherwise."""
    match = _CHECKPOINT.match(value.strip())
    if match is None or int(match.group(1)) > _MAX_BLOCK:
        raise UsageProblem(
            f"--after {value!r} is not a checkpoint: BLOCK:TXID as printed by "
            "`ledgerlens ledger events`, or BLOCK for after a whole block"
        )
    return ledger_pb2.Checkpoint(block_number=int(match.group(1)), tx_id=match.group(2) or "")


def format_checkpoint(checkpoint: ledger_pb2.Checkpoint) -> str:
    return f"{checkpoint.block_number}:{checkpoint.tx_id}"


def _short(sha: object) -> str:
    return str(sha)[:_SHORT_SHA] if sha else "-"


def _describe_record(record: dict[str, Any]) -> str:
    if "document_id" in record:
        version = record.get("version", "?")
        return f"{record['document_id']} v{version} sha256 {_short(record.get('sha256'))}"
    if "request_id" in record:
        return (
            f"request {record['request_id']} model {record.get('model', '?')} "
            f"answer sha256 {_short(record.get('answer_sha256'))}"
        )
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _truncate(text: str, limit: int = _SUMMARY_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def payload_summary(payload: bytes) -> str:
    """A short line about an event's payload: the anchoring contract's records by their
    ids and short checksums, other JSON compacted, other bytes by their size."""
    if not payload:
        return "-"
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return f"<{len(payload)} bytes>"
    if isinstance(value, dict):
        records = value.get("records")
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            shown = ", ".join(_describe_record(r) for r in records[:3])
            more = f", … (+{len(records) - 3})" if len(records) > 3 else ""
            return _truncate(f"{len(records)} record(s): {shown}{more}", _SUMMARY_CHARS * 2)
        return _truncate(_describe_record(value))
    return _truncate(json.dumps(value, separators=(",", ":")))


def _payload_json(payload: bytes) -> Any:
    try:
        return {"json": json.loads(payload)}
    except (UnicodeDecodeError, ValueError):
        return {"base64": base64.b64encode(payload).decode()}


@dataclass
class EventsRun:
    """What one ``ledger events`` run saw: kept outside the coroutine so the checkpoint
    survives a Ctrl-C."""

    checkpoint: ledger_pb2.Checkpoint | None = None
    count: int = 0
    #: why the stream ended early (one line), if it did.
    aborted: str | None = None


def _event_line(response: ledger_pb2.StreamEventsResponse) -> str:
    event = response.event
    return (
        f"block {event.block_number}  tx {event.tx_id}  {event.event_name}  "
        f"{payload_summary(event.payload)}"
    )


def _event_json(response: ledger_pb2.StreamEventsResponse) -> str:
    event = response.event
    return json.dumps(
        {
            "block_number": event.block_number,
            "tx_id": event.tx_id,
            "chaincode": event.chaincode,
            "event_name": event.event_name,
            "committed_at": (
                event.committed_at.ToJsonString() if event.HasField("committed_at") else None
            ),
            "payload": _payload_json(event.payload),
            "checkpoint": format_checkpoint(response.checkpoint),
        },
        separators=(",", ":"),
    )


async def stream_events(
    session: Session,
    request: ledger_pb2.StreamEventsRequest,
    run: EventsRun,
    *,
    follow: bool,
    idle_seconds: float,
    as_json: bool,
) -> None:
    """Print ``StreamEvents`` responses, recording progress in ``run``, until the stream
    ends, or (unless ``follow``) no event arrived for ``idle_seconds``.

    Raises :class:`UsageProblem` when the ledger cannot be reached and :class:`CliError`
    when it refuses before the first event; a failure after that is ``run.aborted``.
    """
    target = session.config.ledger_target
    token = await session.token()
    async with ledger_client(
        target,
        token_provider=static_token(token),
        # an event stream lasts as long as it lasts; keepalive notices a dead peer
        stream_timeout=None,
        retry=None,
    ) as client:
        call = client.stub.StreamEvents(request)
        responses = aiter(call)

        async def next_response() -> ledger_pb2.StreamEventsResponse:
            return await anext(responses)

        try:
            while True:
                try:
                    if follow:
                        response = await next_response()
                    else:
                        response = await asyncio.wait_for(next_response(), idle_seconds)
                except TimeoutError:
                    return  # quiet for idle_seconds: caught up with the head
                except StopAsyncIteration:
                    return
                typer.echo(_event_json(response) if as_json else _event_line(response))
                run.checkpoint = response.checkpoint
                run.count += 1
        except grpc.aio.AioRpcError as exc:
            if run.count == 0:
                raise rpc_failure(exc, SERVICE, target) from exc
            run.aborted = describe_rpc_error(exc, SERVICE, target)
        finally:
            call.cancel()


def _resume_hint(run: EventsRun, request: ledger_pb2.StreamEventsRequest) -> tuple[str, str]:
    """The checkpoint to resume after (``B:TX``, or ``""``) and the options that do it."""
    if run.checkpoint is not None:
        point = format_checkpoint(run.checkpoint)
        return point, f"--after {point}"
    start = request.WhichOneof("start")
    if start == "after":
        point = format_checkpoint(request.after)
        return point, f"--after {point}"
    if start == "start_block":
        if request.start_block > 0:
            point = f"{request.start_block - 1}:"
            return point, f"--after {point}"
        return "", "--from 0"
    return "", "--follow"


def _report_end(run: EventsRun, request: ledger_pb2.StreamEventsRequest, as_json: bool) -> None:
    point, options = _resume_hint(run, request)
    if as_json:
        typer.echo(
            json.dumps(
                {"events": run.count, "checkpoint": point or None, "resume": options},
                separators=(",", ":"),
            )
        )
        return
    noun = "event" if run.count == 1 else "events"
    if point:
        typer.echo(
            f"{run.count} {noun}; checkpoint {point} "
            f"(continue with: ledgerlens ledger events {options})"
        )
    else:
        typer.echo(f"{run.count} {noun} (continue with: ledgerlens ledger events {options})")


@ledger_app.command("events")
def events(
    ctx: typer.Context,
    from_block: Annotated[
        int | None,
        typer.Option(
            "--from", min=0, help="Start with this block (inclusive; 0 is the genesis block)."
        ),
    ] = None,
    after: Annotated[
        str | None,
        typer.Option(
            "--after",
            metavar="BLOCK:TXID",
            help="Resume right after this checkpoint (as printed at the end of a run); "
            "BLOCK alone means after that whole block.",
        ),
    ] = None,
    chaincode: Annotated[
        str, typer.Option("--chaincode", help="The chaincode (default: the service's, anchoring).")
    ] = "",
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Only events of this name (repeatable: any of them)."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow/--no-follow",
            help="Keep streaming new events until Ctrl-C (default: stop once caught up).",
        ),
    ] = False,
    idle: Annotated[
        float,
        typer.Option(
            "--idle",
            min=0.1,
            help="Without --follow: stop once no event arrived for this many seconds "
            "(the stream has no end-of-history marker; quiet means caught up).",
        ),
    ] = DEFAULT_IDLE_SECONDS,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per event, then one with the checkpoint."),
    ] = False,
) -> None:
    """Stream chaincode events in ledger order: block, tx id, event name and a payload
    summary per line, then the checkpoint to resume after.

    Without --from or --after: every event from block 0 (with --follow: only events
    committed from now on). Without --follow the command stops once caught up, i.e.
    when no event has arrived for --idle seconds.

    Exit 0, 1 if the service refuses (or the stream breaks), 2 on a usage error or no
    service. Ctrl-C prints the checkpoint too (exit 130).
    """
    run = EventsRun()
    request = ledger_pb2.StreamEventsRequest(chaincode=chaincode, event_names=name or [])
    with exit_codes(on_interrupt=lambda: _report_end(run, request, as_json)):
        if from_block is not None and after is not None:
            raise UsageProblem("give --from or --after, not both")
        if after is not None:
            request.after.CopyFrom(parse_checkpoint(after))
        elif from_block is not None:
            request.start_block = from_block
        elif not follow:
            request.start_block = 0
        session = Session(config_of(ctx))
        asyncio.run(
            stream_events(session, request, run, follow=follow, idle_seconds=idle, as_json=as_json)
        )
    _report_end(run, request, as_json)
    if run.aborted is not None:
        typer.echo(f"error: the stream broke after {run.count} event(s): {run.aborted}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``ledger ...`` to the ``ledgerlens`` app."""
    app.command("verify")(verify)
    app.add_typer(ledger_app, name="ledger")

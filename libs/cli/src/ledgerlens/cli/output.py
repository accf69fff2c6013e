"""What the commands share in how they end and print: the exit codes of a failure, the
JSON of a response, and the pieces of a retrieved passage (snippet, heading path,
provenance) that ``search`` and ``ask`` show alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.text import Text

from ledgerlens.cli.config import CliError, UsageProblem
from ledgerlens.common.v1 import common_pb2

__all__ = [
    "INTERRUPTED",
    "SHORT_SHA_CHARS",
    "exit_codes",
    "heading_path",
    "print_json",
    "provenance_text",
    "say_interrupted",
    "snippet",
]

#: exit code of a command interrupted with Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130
SHORT_SHA_CHARS = 12


@contextmanager
def exit_codes(
    *,
    before: Callable[[], None] | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> Iterator[None]:
    """A :class:`UsageProblem` is ``error: ...`` on stderr and exit 2, any other
    :class:`CliError` the same with exit 1; with ``on_interrupt``, Ctrl-C calls it and
    exits :data:`INTERRUPTED` (without, it propagates). ``before`` runs first either way."""
    try:
        yield
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        if before is not None:
            before()
        on_interrupt()
        raise typer.Exit(INTERRUPTED) from None
    except CliError as exc:
        if before is not None:
            before()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if isinstance(exc, UsageProblem) else 1) from None


def say_interrupted() -> None:
    typer.echo("interrupted", err=True)


def print_json(message: Message) -> None:
    """``message`` in protobuf's JSON mapping, every field shown."""
    typer.echo(
        json_format.MessageToJson(message, indent=2, always_print_fields_with_no_presence=True)
    )


def snippet(text: str, limit: int) -> str:
    """``text`` on one line, cut to at most ``limit`` characters at a word (``…``)."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:.") + "…"


def heading_path(path: list[str] | tuple[str, ...]) -> str:
    """``A > B > C``, each heading on one line (``""`` for none)."""
    return " > ".join(" ".join(h.split()) for h in path)


def provenance_text(provenance: common_pb2.Provenance) -> Text:
    """Source URL, then version and short sha256, then the anchor when there is one."""
    lines = [
        provenance.source_url or "-",
        f"v{provenance.version} · sha256 {provenance.sha256[:SHORT_SHA_CHARS] or '-'}",
    ]
    if provenance.HasField("anchor") and provenance.anchor.tx_id:
        lines.append(
            f"anchor tx {provenance.anchor.tx_id} (block {provenance.anchor.block_number})"
        )
    return Text("\n".join(lines))

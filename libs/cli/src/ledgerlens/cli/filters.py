"""The retrieval filter options (``--chain`` ... ``--until``), declared once for every
command that retrieves (``search``, ``ask``): :func:`filter_options` adds them to a
command, which receives them as one ``SearchFilter`` in its ``filters`` parameter."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from google.protobuf.timestamp_pb2 import Timestamp

from ledgerlens.cli.ingest import DOC_TYPES, DocType
from ledgerlens.retrieval.v1 import retrieval_pb2

__all__ = ["FILTERS_PARAMETER", "build_filter", "filter_options", "parse_when"]

#: the parameter of a command decorated with :func:`filter_options` that gets the filter.
FILTERS_PARAMETER = "filters"

_REPEATABLE = "(repeatable: any of them)."
#: the options, in the order ``--help`` lists them, by the parameter name they have.
_OPTIONS: dict[str, Any] = {
    "chain": Annotated[
        list[str] | None,
        typer.Option("--chain", help=f"Only this chain, e.g. ethereum {_REPEATABLE}"),
    ],
    "author": Annotated[
        list[str] | None, typer.Option("--author", help=f"Only this author {_REPEATABLE}")
    ],
    "tag": Annotated[
        list[str] | None,
        typer.Option("--tag", help=f"Only documents with this tag {_REPEATABLE}"),
    ],
    "doc_type": Annotated[
        list[DocType] | None,
        typer.Option("--doc-type", help=f"Only this document type {_REPEATABLE}"),
    ],
    "contract": Annotated[
        list[str] | None,
        typer.Option("--contract", help=f"Only documents about this 0x address {_REPEATABLE}"),
    ],
    "source_prefix": Annotated[
        str | None,
        typer.Option("--source-prefix", help="Only sources whose URL starts with this."),
    ],
    "since": Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Published on or after (2021-01-01 or ISO 8601; UTC unless a zone is given).",
        ),
    ],
    "until": Annotated[
        str | None,
        typer.Option("--until", help="Published before (exclusive; same format as --since)."),
    ],
}


def parse_when(value: str, option: str) -> Timestamp:
    """``2021-01-01`` or an ISO 8601 date-time (a time without zone is UTC)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date (2021-01-01) or ISO 8601 date-time (2021-01-01T12:00:00Z)",
            param_hint=option,
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    stamp = Timestamp()
    try:
        stamp.FromDatetime(parsed)
    except (ValueError, OverflowError):
        raise typer.BadParameter(
            f"{value!r} is outside 0001-01-01 - 9999-12-31 (UTC)", param_hint=option
        ) from None
    return stamp


def build_filter(
    *,
    chains: list[str] | None = None,
    authors: list[str] | None = None,
    tags: list[str] | None = None,
    doc_types: list[DocType] | None = None,
    contracts: list[str] | None = None,
    source_prefix: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> retrieval_pb2.SearchFilter:
    """The ``SearchFilter`` of the options; a bad date is a usage error (nothing sent)."""
    flt = retrieval_pb2.SearchFilter(
        chains=chains or [],
        authors=authors or [],
        tags=tags or [],
        doc_types=[DOC_TYPES[d] for d in doc_types or []],
        contract_addresses=contracts or [],
        source_url_prefix=source_prefix or "",
    )
    if since is not None:
        flt.published_after.CopyFrom(parse_when(since, "--since"))
    if until is not None:
        flt.published_before.CopyFrom(parse_when(until, "--until"))
    return flt


def filter_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the filter options where its ``filters`` parameter was (typer reads
    the signature); it is called with their ``SearchFilter`` (built before anything else
    runs, so a bad date is a usage error with nothing sent)."""
    signature = inspect.signature(command, eval_str=True)
    parameters = list(signature.parameters.values())
    at = [p.name for p in parameters].index(FILTERS_PARAMETER)
    options = [
        inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation
        )
        for name, annotation in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def with_filters(*args: Any, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name, None) for name in _OPTIONS}
        kwargs[FILTERS_PARAMETER] = build_filter(
            chains=given["chain"],
            authors=given["author"],
            tags=given["tag"],
            doc_types=given["doc_type"],
            contracts=given["contract"],
            source_prefix=given["source_prefix"],
            since=given["since"],
            until=given["until"],
        )
        command(*args, **kwargs)

    shown = signature.replace(parameters=[*parameters[:at], *options, *parameters[at + 1 :]])
    with_filters.__signature__ = shown  # type: ignore[attr-defined]
    with_filters.__annotations__ = {p.name: p.annotation for p in shown.parameters.values()} | {
        "return": signature.return_annotation
    }
    return with_filters

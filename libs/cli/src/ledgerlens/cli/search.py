"""``ledgerlens search QUERY``: one ``RetrievalService.Search`` call, printed as a table
(rank, score, document, heading path, snippet, provenance) or, with ``--json``, as the
response in protobuf's JSON mapping.

Everything the contract validates (``top_k`` over the service's maximum, ``dense_weight``
out of range or without weighted fusion, a bad contract checksum, ``--until`` not after
``--since``) is left to the service, whose INVALID_ARGUMENT names the field; only what
cannot even be put in the request (a date that does not parse) is a usage error here.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Annotated

import grpc
import grpc.aio
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ledgerlens.cli.filters import filter_options, parse_when
from ledgerlens.cli.identity import CLI_RETRY, Session, config_of
from ledgerlens.cli.ingest import rpc_failure
from ledgerlens.cli.output import exit_codes, heading_path, print_json, provenance_text, snippet
from ledgerlens.common.v1 import common_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.clients import retrieval_client, static_token

__all__ = [
    "Fusion",
    "build_request",
    "document_label",
    "parse_when",
    "print_results",
    "register",
    "search",
]

SERVICE = "retrieval"
#: the snippet of a chunk's text in the table, in characters (whole words).
SNIPPET_CHARS = 160
_INT32_MAX = 2**31 - 1


class Fusion(StrEnum):
    """``SearchRequest.fusion``, as the option spells it."""

    rrf = "rrf"
    weighted = "weighted"
    dense = "dense"
    keyword = "keyword"


_FUSIONS = {
    Fusion.rrf: retrieval_pb2.FUSION_MODE_RRF,
    Fusion.weighted: retrieval_pb2.FUSION_MODE_WEIGHTED,
    Fusion.dense: retrieval_pb2.FUSION_MODE_DENSE,
    Fusion.keyword: retrieval_pb2.FUSION_MODE_KEYWORD,
}


# -- the request -----------------------------------------------------------------------


def build_request(
    query: str,
    flt: retrieval_pb2.SearchFilter,
    *,
    top_k: int = 10,
    fusion: Fusion | None = None,
    dense_weight: float | None = None,
    min_score: float | None = None,
) -> retrieval_pb2.SearchRequest:
    """The ``SearchRequest`` of the options; ``flt`` as :func:`ledgerlens.cli.filters.build_filter`
    builds it."""
    if fusion is None and dense_weight is not None:
        fusion = Fusion.weighted  # the only mode a dense weight means anything in
    request = retrieval_pb2.SearchRequest(
        query=query,
        filter=flt,
        # over the service's maximum is for the service to refuse, naming top_k; only
        # a number too big for the wire is capped
        top_k=min(top_k, _INT32_MAX),
        fusion=_FUSIONS[fusion] if fusion is not None else retrieval_pb2.FUSION_MODE_UNSPECIFIED,
    )
    if dense_weight is not None:
        request.dense_weight = dense_weight
    if min_score is not None:
        request.min_score = min_score
    return request


async def _search(
    session: Session, target: str, request: retrieval_pb2.SearchRequest
) -> retrieval_pb2.SearchResponse:
    token = await session.token()
    async with retrieval_client(
        target,
        token_provider=static_token(token),
        default_timeout=session.config.timeout_seconds,
        retry=CLI_RETRY,
    ) as client:
        try:
            response: retrieval_pb2.SearchResponse = await client.stub.Search(request)
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc, SERVICE, target) from exc
    return response


# -- output ----------------------------------------------------------------------------


def document_label(chunk: retrieval_pb2.Chunk) -> str:
    """The document as a person knows it: its title (with its EIP number), else the
    EIP number, else its id."""
    meta = chunk.metadata
    title = " ".join(meta.title.split())
    eip = meta.attributes.get("eip", "").strip()
    number = f"EIP-{eip}" if meta.doc_type == common_pb2.DOC_TYPE_EIP and eip else ""
    if title and number and not title.upper().startswith(("EIP-", "ERC-")):
        return f"{number}: {title}"
    return title or number or chunk.provenance.document_id


_FUSION_NAMES = {
    retrieval_pb2.FUSION_MODE_RRF: "rrf",
    retrieval_pb2.FUSION_MODE_WEIGHTED: "weighted",
    retrieval_pb2.FUSION_MODE_DENSE: "dense",
    retrieval_pb2.FUSION_MODE_KEYWORD: "keyword",
}


def print_results(console: Console, response: retrieval_pb2.SearchResponse) -> None:
    fusion = _FUSION_NAMES.get(response.fusion, "?")
    took = f"{response.took_micros / 1000:.1f} ms"
    if not response.results:
        console.print(Text(f"No results ({fusion} fusion, {took})."))
        return
    count = len(response.results)
    table = Table(
        # Text, never markup: titles and chunk text may hold [brackets]
        title=Text(f"{count} result{'s' if count != 1 else ''} ({fusion} fusion, {took})"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("document", min_width=10, ratio=2, overflow="fold")
    table.add_column("heading path", min_width=8, ratio=2, overflow="fold")
    table.add_column("snippet", min_width=16, ratio=4, overflow="fold")
    table.add_column("source", min_width=16, ratio=3, overflow="fold")
    for result in response.results:
        chunk = result.chunk
        table.add_row(
            str(result.rank),
            f"{result.score:.4f}",
            Text(document_label(chunk)),
            Text(heading_path(list(chunk.heading_path)) or "-"),
            Text(snippet(chunk.text, SNIPPET_CHARS)),
            provenance_text(chunk.provenance),
        )
    console.print(table)


# -- the command -----------------------------------------------------------------------


@filter_options
def search(
    ctx: typer.Context,
    query: Annotated[
        str,
        typer.Argument(
            help="What to look for, in plain words.", metavar="QUERY", show_default=False
        ),
    ],
    filters: retrieval_pb2.SearchFilter,
    top_k: Annotated[
        int,
        typer.Option("-k", "--top-k", min=1, help="How many results (the service allows 1-100)."),
    ] = 10,
    fusion: Annotated[
        Fusion | None,
        typer.Option(
            "--fusion", help="How dense and keyword rankings combine (default: the service's, rrf)."
        ),
    ] = None,
    dense_weight: Annotated[
        float | None,
        typer.Option(
            "--dense-weight",
            help="Weight of the dense ranking in [0, 1] (implies --fusion weighted; default 0.5).",
        ),
    ] = None,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Drop results scoring below this.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the response as JSON instead of a table.")
    ] = False,
) -> None:
    """Search the ingested documents; filters AND together, a repeated option's values OR.

    Exit 0 (also with no results), 1 if the service refuses it, 2 on a usage error or no service.
    """
    request = build_request(
        query,
        filters,
        top_k=top_k,
        fusion=fusion,
        dense_weight=dense_weight,
        min_score=min_score,
    )
    with exit_codes():
        config = config_of(ctx)
        response = asyncio.run(_search(Session(config), config.retrieval_target, request))
    if as_json:
        print_json(response)
    else:
        print_results(Console(), response)


def register(app: typer.Typer) -> None:
    """Add ``search`` to the ``ledgerlens`` app."""
    app.command("search")(search)

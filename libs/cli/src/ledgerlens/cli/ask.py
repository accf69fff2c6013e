"""``ledgerlens ask QUESTION`` and ``ledgerlens usage``: the inference service for people.

``ask`` makes one ``InferenceService.AnswerStream`` call and prints the answer as its
deltas arrive, then the numbered sources its ``[n]`` markers cite and one usage line;
``--json`` collects the stream into the ``AnswerResponse`` the unary ``Answer`` would
have returned. ``usage`` pages through ``GetUsage`` and prints one table with the
totals of the whole selection.

The retrieval filters are ``ledgerlens search``'s (:mod:`ledgerlens.cli.filters`); what the
contract validates (``top_k`` range, an unknown model or template, ``--until`` not after
``--since``) is left to the service, whose INVALID_ARGUMENT names the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

import grpc
import grpc.aio
import typer
from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from ledgerlens.cli.config import CliConfig, CliError
from ledgerlens.cli.filters import filter_options, parse_when
from ledgerlens.cli.identity import CLI_RETRY, Session, config_of
from ledgerlens.cli.ingest import rpc_failure
from ledgerlens.cli.output import (
    exit_codes,
    heading_path,
    print_json,
    provenance_text,
    say_interrupted,
    snippet,
)
from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.runtime.clients import inference_client, static_token

__all__ = [
    "ANSWER_TIMEOUT_SECONDS",
    "CollectedAnswer",
    "Granularity",
    "ask",
    "format_cost",
    "print_sources",
    "print_usage",
    "register",
    "usage",
]

SERVICE = "inference"
#: the deadline of an answer when ``--timeout`` is not given: a model writing an answer
#: takes longer than a lookup (the service's retries and fallbacks all fit inside it).
ANSWER_TIMEOUT_SECONDS = 120.0
#: a source's quote in the list, in characters (whole words).
QUOTE_CHARS = 320
_MICRO = Decimal(1_000_000)


# -- ask: the stream -------------------------------------------------------------------


@dataclass
class CollectedAnswer:
    """What an ``AnswerStream`` delivered, in the order it did."""

    deltas: list[str] = field(default_factory=list)
    citations: inference_pb2.CitationList | None = None
    usage: inference_pb2.Usage | None = None
    final: inference_pb2.StreamFinal | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def response(self) -> inference_pb2.AnswerResponse:
        """The stream as the unary ``Answer`` would have answered."""
        final = self.final if self.final is not None else inference_pb2.StreamFinal()
        citations = self.citations if self.citations is not None else inference_pb2.CitationList()
        return inference_pb2.AnswerResponse(
            completion_id=final.completion_id,
            answer=self.text,
            citations=citations.citations,
            grounded=citations.grounded,
            finish_reason=final.finish_reason,
            model=final.model,
            provider=final.provider,
            template=final.template,
            usage=self.usage if self.usage is not None else inference_pb2.Usage(),
            cached=final.cached,
        )


async def _stream_answer(
    session: Session,
    target: str,
    request: inference_pb2.AnswerStreamRequest,
    deadline_seconds: float,
    on_delta: Callable[[str], None],
    collected: CollectedAnswer,
) -> None:
    token = await session.token()
    async with inference_client(
        target,
        token_provider=static_token(token),
        default_timeout=deadline_seconds,
        stream_timeout=deadline_seconds,
        retry=CLI_RETRY,
    ) as client:
        try:
            async for event in client.stub.AnswerStream(request):
                kind = event.WhichOneof("event")
                if kind == "delta":
                    collected.deltas.append(event.delta)
                    on_delta(event.delta)
                elif kind == "citations":
                    collected.citations = event.citations
                elif kind == "usage":
                    collected.usage = event.usage
                elif kind == "final":
                    collected.final = event.final
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc, SERVICE, target) from exc
    if collected.final is None:
        raise CliError(f"{SERVICE} at {target} ended the answer stream before its final event")


# -- ask: output -----------------------------------------------------------------------


def format_cost(micro_usd: int) -> str:
    """Micro-USD as dollars, to the micro-dollar (``0.000150``)."""
    return f"{Decimal(micro_usd) / _MICRO:.6f}"


def print_sources(console: Console, citations: list[inference_pb2.Citation]) -> None:
    """``[n] title — heading path``, then the quote and the provenance, indented."""
    if not citations:
        return
    console.print(Text("Sources", style="bold"))
    for citation in citations:
        provenance = citation.provenance
        # Text, never markup: titles and quotes may hold [brackets]
        line = Text(f"[{citation.number}] ", style="bold")
        line.append(" ".join(citation.title.split()) or provenance.document_id or "-")
        heading = heading_path(list(citation.heading_path))
        if heading:
            line.append(f" — {heading}", style="dim")
        console.print(line)
        quote = snippet(citation.quote, QUOTE_CHARS)
        console.print(Padding(Text(f"“{quote}”", style="italic"), (0, 0, 0, 4), expand=False))
        console.print(Padding(provenance_text(provenance), (0, 0, 0, 4), expand=False))


def _usage_line(response: inference_pb2.AnswerResponse) -> Text:
    used = response.usage
    counted = ", counted locally" if used.estimated else ""
    served = response.model + (f" via {response.provider}" if response.provider else "")
    parts = [
        f"{used.total_tokens} tokens ({used.prompt_tokens} prompt + "
        f"{used.completion_tokens} completion{counted})",
        f"${format_cost(used.cost_micro_usd)}",
        served or "-",
        f"template {response.template or '-'}",
        f"cached {'yes' if response.cached else 'no'}",
    ]
    if response.completion_id:
        parts.append(f"completion {response.completion_id}")
    return Text("usage: " + " · ".join(parts), style="dim")


def _print_tail(console: Console, response: inference_pb2.AnswerResponse) -> None:
    if not response.grounded:
        console.print(
            Text(
                "note: not grounded: the retrieved passages do not answer this question, "
                "so the answer cites no source.",
                style="yellow",
            )
        )
    print_sources(console, list(response.citations))
    console.print(_usage_line(response))


def _deadline(ctx: typer.Context, config: CliConfig) -> float:
    """``--timeout`` when given, else :data:`ANSWER_TIMEOUT_SECONDS`."""
    source = ctx.find_root().get_parameter_source("timeout")
    # by name: typer may carry a click of its own, whose enum is not click's
    if source is None or source.name == "DEFAULT":
        return max(config.timeout_seconds, ANSWER_TIMEOUT_SECONDS)
    return config.timeout_seconds


@filter_options
def ask(
    ctx: typer.Context,
    question: Annotated[
        str,
        typer.Argument(
            help="The question, in plain words.", metavar="QUESTION", show_default=False
        ),
    ],
    filters: retrieval_pb2.SearchFilter,
    top_k: Annotated[
        int | None,
        typer.Option(
            "-k",
            "--top-k",
            min=1,
            help="Passages to retrieve (the service allows 1-50; default 8).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model or alias (default: the service's, e.g. extractive)."),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Prompt template, optionally @version (e.g. answer@1)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the whole answer as JSON (AnswerResponse) at the end."),
    ] = False,
) -> None:
    """Answer a question from the ingested documents, citing them as [n].

    Exit 0 (also when the passages do not answer it), 1 if the service refuses it, 2 on a
    usage error or no service, 130 when interrupted.
    """
    request = inference_pb2.AnswerStreamRequest(
        answer=inference_pb2.AnswerRequest(
            query=question,
            filter=filters,
            top_k=min(top_k or 0, 2**31 - 1),
            model=model or "",
            template=template or "",
        )
    )
    console = Console()
    collected = CollectedAnswer()

    def show(delta: str) -> None:
        console.print(delta, end="", markup=False, highlight=False, emoji=False, soft_wrap=True)

    def end_answer_line() -> None:
        # a partial answer on screen: the error or the sources start on a line of their own
        if not as_json and collected.deltas and not collected.text.endswith("\n"):
            console.print()

    config = config_of(ctx)
    with exit_codes(before=end_answer_line, on_interrupt=say_interrupted):
        asyncio.run(
            _stream_answer(
                Session(config),
                config.inference_target,
                request,
                _deadline(ctx, config),
                (lambda _: None) if as_json else show,
                collected,
            )
        )
    response = collected.response()
    if as_json:
        print_json(response)
        return
    end_answer_line()
    _print_tail(console, response)


# -- usage -----------------------------------------------------------------------------


class Granularity(StrEnum):
    """``GetUsageRequest.granularity``, as the option spells it."""

    hour = "hour"
    day = "day"
    month = "month"


_GRANULARITIES = {
    Granularity.hour: inference_pb2.USAGE_GRANULARITY_HOUR,
    Granularity.day: inference_pb2.USAGE_GRANULARITY_DAY,
    Granularity.month: inference_pb2.USAGE_GRANULARITY_MONTH,
}
_PERIOD_FORMATS = {
    Granularity.hour: "%Y-%m-%d %H:00",
    Granularity.day: "%Y-%m-%d",
    Granularity.month: "%Y-%m",
}


async def _usage_pages(
    session: Session, target: str, request: inference_pb2.GetUsageRequest
) -> inference_pb2.GetUsageResponse:
    """Every page of the selection in one response (rows in order, the totals once)."""
    token = await session.token()
    merged = inference_pb2.GetUsageResponse()
    seen: set[str] = set()
    async with inference_client(
        target,
        token_provider=static_token(token),
        default_timeout=session.config.timeout_seconds,
        retry=CLI_RETRY,
    ) as client:
        while True:
            try:
                page: inference_pb2.GetUsageResponse = await client.stub.GetUsage(request)
            except grpc.aio.AioRpcError as exc:
                raise rpc_failure(exc, SERVICE, target) from exc
            merged.rows.extend(page.rows)
            merged.total.CopyFrom(page.total)
            following = page.next_page_token
            if not following:
                return merged
            if following in seen:  # a service bug must not make this loop forever
                raise CliError(f"{SERVICE} at {target} returned one page token twice")
            seen.add(following)
            request.page_token = following


def _period(row: inference_pb2.UsageRow, granularity: Granularity) -> str:
    start: datetime = row.period_start.ToDatetime()
    return start.strftime(_PERIOD_FORMATS[granularity])


def print_usage(
    console: Console, response: inference_pb2.GetUsageResponse, granularity: Granularity
) -> None:
    if not response.rows:
        console.print(Text("No usage in this period."))
        return
    count = len(response.rows)
    table = Table(
        title=Text(f"{count} row{'s' if count != 1 else ''} (per {granularity.value}, UTC)"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_footer=False,
    )
    table.add_column("period", no_wrap=True)
    table.add_column("key", overflow="fold")
    table.add_column("model", overflow="fold")
    table.add_column("requests", justify="right", no_wrap=True)
    table.add_column("prompt", justify="right", no_wrap=True)
    table.add_column("completion", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("cost USD", justify="right", no_wrap=True)

    def numbers(row: inference_pb2.UsageRow) -> list[str]:
        return [
            str(row.requests),
            str(row.prompt_tokens),
            str(row.completion_tokens),
            str(row.prompt_tokens + row.completion_tokens),
            format_cost(row.cost_micro_usd),
        ]

    for row in response.rows:
        table.add_row(
            _period(row, granularity), Text(row.api_key_id), Text(row.model), *numbers(row)
        )
    table.add_section()
    table.add_row(Text("total", style="bold"), "", "", *numbers(response.total))
    console.print(table)


def usage(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="From (inclusive; 2021-01-01 or ISO 8601, UTC unless a zone is given; "
            "default 30 days before --until).",
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="To (exclusive; same format; default now)."),
    ] = None,
    granularity: Annotated[
        Granularity, typer.Option("--granularity", help="One row per hour, day or month (UTC).")
    ] = Granularity.day,
    model: Annotated[str | None, typer.Option("--model", help="Only this concrete model.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this API key (llk_...).")] = None,
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", help="Another tenant than the key's own (needs admin)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every row and the totals as JSON.")
    ] = False,
) -> None:
    """Tokens and cost per period, API key and model, with the totals (needs usage:read).

    Exit 0 (also with no usage), 1 if the service refuses it, 2 on a usage error or no service.
    """
    request = inference_pb2.GetUsageRequest(
        api_key_id=key or "",
        tenant_id=tenant or "",
        model=model or "",
        granularity=_GRANULARITIES[granularity],
        page_size=1000,
    )
    if since is not None:
        request.start_time.CopyFrom(parse_when(since, "--since"))
    if until is not None:
        request.end_time.CopyFrom(parse_when(until, "--until"))
    with exit_codes(on_interrupt=say_interrupted):
        config = config_of(ctx)
        response = asyncio.run(_usage_pages(Session(config), config.inference_target, request))
    if as_json:
        print_json(response)
    else:
        print_usage(Console(), response, granularity)


def register(app: typer.Typer) -> None:
    """Add ``ask`` and ``usage`` to the ``ledgerlens`` app."""
    app.command("ask")(ask)
    app.command("usage")(usage)

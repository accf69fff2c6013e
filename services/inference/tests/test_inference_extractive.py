"""The local extractive answerer: passage format, verbatim quotes with [n], refusal."""

from __future__ import annotations

import re

import pytest

from ledgerlens.embedding import Embedder
from ledgerlens.services.inference.model import ChatParams, Deadline, Message, ProviderError
from ledgerlens.services.inference.providers import (
    NO_ANSWER,
    ExtractiveProvider,
    answer_from_passages,
    format_passages,
    parse_passages,
    question_of,
)

PASSAGES = [
    (
        1,
        "EIP-1559 introduces a base fee per gas for every block.\n"
        "The base fee is burned rather than paid to the miner. Users may add a priority "
        "fee (a tip) to have their transaction included sooner.",
    ),
    (
        2,
        "## Gas limit\n\nThe block gas limit is adjusted by the proposer, e.g. up or down by "
        "1/1024 of the parent's limit. Blocks may use up to twice the target gas.",
    ),
    (
        3,
        "Under proof of stake, a block becomes final after two epochs.\n\n"
        "- Validators attest to checkpoints.\n"
        "- See [1]: https://ethereum.org/finality for details.",
    ),
]


def _params(question: str, passages: list[tuple[int, str]] = PASSAGES) -> ChatParams:
    prompt = (
        "Answer only from the passages and cite them as [n].\n\n"
        f"{format_passages(passages)}\n\nQuestion: {question}"
    )
    return ChatParams(
        "extractive", (Message("system", "You are careful."), Message("user", prompt))
    )


def test_format_and_parse_round_trip() -> None:
    text = format_passages(PASSAGES)
    assert text.startswith("[1] EIP-1559 introduces")
    assert "\n[/1]\n\n[2] ## Gas limit" in text
    assert parse_passages(f"intro\n\n{text}\n\nQuestion: x") == PASSAGES
    with pytest.raises(ValueError, match="unique"):
        format_passages([(1, "a"), (1, "b")])
    with pytest.raises(ValueError, match="end line"):
        format_passages([(2, "a\n[/2]\nb")])


def test_question_of() -> None:
    assert question_of(_params("what is burned?").messages) == "what is burned?"
    assert question_of([Message("user", "plain question")]) == "plain question"
    assert question_of([Message("system", "only a system message")]) == ""


async def test_answers_with_verbatim_quotes_and_their_passage_numbers() -> None:
    provider = ExtractiveProvider()
    completion = await provider.chat(_params("What happens to the base fee?"), Deadline.after(5))

    assert completion.usage is None
    assert completion.finish_reason == "stop"
    assert "The base fee is burned rather than paid to the miner. [1]" in completion.text
    assert "priority" not in completion.text  # a weaker match is left out
    passages = dict(PASSAGES)
    cited = re.findall(r"(.+?) \[(\d+)\](?: |$)", completion.text)
    assert cited
    for quote, number in cited:
        assert quote in passages[int(number)]  # verbatim, from the passage it cites

    finality = await provider.chat(_params("When does a block become final?"), Deadline.after(5))
    assert finality.text.startswith(
        "Under proof of stake, a block becomes final after two epochs. [3]"
    )
    gas = answer_from_passages("How is the gas limit adjusted?", PASSAGES)
    assert gas.quotes[0].number == 2
    # "e.g." does not end the sentence
    assert gas.quotes[0].text.endswith("by 1/1024 of the parent's limit.")
    assert gas.grounded


async def test_an_unrelated_question_is_not_answered() -> None:
    provider = ExtractiveProvider()
    completion = await provider.chat(
        _params("Who won the football world cup in 1998?"), Deadline.after(5)
    )
    assert completion.text == NO_ANSWER
    assert not re.search(r"\[\d+\]", completion.text)
    assert not answer_from_passages("anything", []).grounded


async def test_stream_is_the_same_text_in_word_chunks_and_deterministic() -> None:
    provider = ExtractiveProvider()
    params = _params("What happens to the base fee?")
    unary = await provider.chat(params, Deadline.after(5))
    deltas = [d async for d in provider.stream(params, Deadline.after(5))]
    assert "".join(d.text for d in deltas) == unary.text
    assert len(deltas) > 5
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is None
    assert (await provider.chat(params, Deadline.after(5))).text == unary.text


async def test_embed_refuses_the_chat_model_and_chat_refuses_the_embed_model() -> None:
    provider = ExtractiveProvider()
    with pytest.raises(ProviderError) as caught:
        await provider.embed(["x"], "extractive", Deadline.after(5))
    assert not caught.value.retryable
    assert "embeddings need all-MiniLM-L6-v2" in caught.value.reason
    with pytest.raises(ProviderError) as caught:
        await provider.chat(
            ChatParams("all-MiniLM-L6-v2", (Message("user", "hi"),)), Deadline.after(5)
        )
    assert not caught.value.retryable


@pytest.mark.slow
async def test_embed_with_the_shared_local_embedder(local_embedder: Embedder) -> None:
    provider = ExtractiveProvider(embedder=local_embedder)
    result = await provider.embed(["base fee", "finality"], "all-MiniLM-L6-v2", Deadline.after(60))
    assert (result.dimensions, result.model, result.provider) == (384, "all-MiniLM-L6-v2", "local")
    assert len(result.vectors) == 2
    assert len(result.vectors[0]) == 384
    assert sum(x * x for x in result.vectors[0]) == pytest.approx(1.0, abs=1e-3)

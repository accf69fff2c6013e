"""Prompt templates: the shipped files load, versions resolve, unknown names are
INVALID_ARGUMENT on ``template``, and rendering carries the passages in the extractive
answerer's numbered format."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.inference import templates
from ledgerlens.services.inference.providers import extractive
from ledgerlens.services.inference.templates import Template, TemplateError, TemplateRegistry

PASSAGES = [
    "The base fee per gas is burned.",
    "Miners receive the priority fee {passages} as a tip.",
]


def write(directory: Path, name: str, version: int, changes: dict[str, str] | None = None) -> None:
    fields = {
        "name": f'"{name}"',
        "version": str(version),
        "passage_format": '"numbered"',
        "no_answer": '"Not in the passages."',
        "no_passages": '"Nothing found."',
        "system": f'"system of {name}@{version}; if unsure: {{no_answer}}"',
        "user": '"""\n{passages}\n\nQ: {question}\n"""',
    }
    fields.update(changes or {})
    body = "\n".join(f"{key} = {value}" for key, value in fields.items())
    (directory / f"{name}@{version}.toml").write_text(body + "\n", encoding="utf-8")


def test_the_shipped_default_is_the_latest_answer_template() -> None:
    default = templates.get("")
    assert default.name == "answer"
    assert default.ref == f"answer@{default.version}"
    assert templates.get("answer") is default
    assert templates.get("  answer@1 ").ref == "answer@1"
    assert "answer@1" in templates.default_registry().refs()


@pytest.mark.parametrize("ref", ["nope", "answer@99", "answer@0", "Answer", "answer@x", "a b"])
def test_an_unknown_template_is_invalid_argument_on_the_template_field(ref: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        templates.get(ref)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.violations] == ["template"]
    assert "answer@1" in caught.value.violations[0][1]


def test_versions_resolve_to_the_latest_unless_pinned(tmp_path: Path) -> None:
    for version in (1, 2, 10):
        write(tmp_path, "answer", version)
    write(tmp_path, "brief", 1)
    (tmp_path / "README.md").write_text("not a template")
    registry = TemplateRegistry.load(tmp_path)
    assert registry.refs() == ["answer@1", "answer@10", "answer@2", "brief@1"]
    assert registry.get("").ref == "answer@10"
    assert registry.get("answer@2").ref == "answer@2"
    assert registry.get("brief").ref == "brief@1"
    assert "system of answer@2" in registry.get("answer@2").system


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"version": "2"}, "disagree"),
        ({"user": '"only {question}"'}, "{passages}"),
        ({"passage_format": '"xml"'}, "passage_format"),
        ({"system": '""'}, "system"),
    ],
)
def test_a_malformed_template_file_fails_at_load(
    tmp_path: Path, changes: dict[str, str], problem: str
) -> None:
    write(tmp_path, "answer", 1, changes)
    with pytest.raises(TemplateError, match=r"answer@1\.toml") as caught:
        TemplateRegistry.load(tmp_path)
    assert problem in str(caught.value)


def test_rendering_puts_the_passages_in_the_extractive_format() -> None:
    template = templates.get("answer@1")
    system, user = template.render("  How is the base fee burned? ", PASSAGES)
    assert system.role == "system"
    assert user.role == "user"
    assert template.no_answer in system.content
    block = extractive.format_passages(list(enumerate(PASSAGES, start=1)))
    assert block in user.content
    assert "How is the base fee burned?" in user.content
    # the extractive answerer reads the same numbered passages back from the prompt
    assert extractive.parse_passages(user.content) == [(1, PASSAGES[0]), (2, PASSAGES[1])]
    assert extractive.question_of([system, user]) == "How is the base fee burned?"


def test_placeholders_are_replaced_once_so_user_text_stays_literal() -> None:
    template = templates.get("answer")
    _, user = template.render("what does {passages} mean?", PASSAGES)
    assert "what does {passages} mean?" in user.content
    assert user.content.count(PASSAGES[0]) == 1
    assert "{passages} as a tip" in user.content


def test_the_no_answer_forms_are_recognised() -> None:
    template = templates.get("answer")
    assert template.is_no_answer(template.no_answer)
    assert template.is_no_answer("  the passages do NOT answer the question")
    assert template.is_no_answer(template.no_passages)
    assert not template.is_no_answer("The base fee is burned [1].")


def test_templates_are_data_files_of_the_package() -> None:
    shipped = Path(templates.__file__).parent / "prompts"
    files = sorted(p.name for p in shipped.glob("*.toml"))
    assert "answer@1.toml" in files
    assert all(isinstance(templates.get(f.removesuffix(".toml")), Template) for f in files)

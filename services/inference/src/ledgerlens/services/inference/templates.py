"""Versioned prompt templates, loaded from the package's ``prompts/`` files.

A template is one TOML file ``prompts/<name>@<version>.toml`` (see ``answer@1.toml``):
its name, version, system and user text with ``{question}``, ``{passages}`` and
``{no_answer}`` placeholders, the passage format, and the exact reply for "the passages
do not answer". Files, not strings in code: a new wording is a new version file, so a
published ``name@version`` always means the same prompt.

``get("")`` is the default template (``answer``, latest version), ``get("answer")`` the
latest ``answer``, ``get("answer@1")`` exactly that version; anything else is
``InvalidArgument`` with a field violation on ``template``.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.inference.model import Message

__all__ = [
    "DEFAULT_TEMPLATE",
    "PASSAGE_FORMATS",
    "Template",
    "TemplateError",
    "TemplateRegistry",
    "default_registry",
    "get",
]

#: the template an empty ``AnswerRequest.template`` means (its latest version)
DEFAULT_TEMPLATE = "answer"

_FILE = re.compile(r"^(?P<name>[a-z][a-z0-9_-]{0,63})@(?P<version>[1-9][0-9]{0,5})\.toml$")
_REF = re.compile(r"^(?P<name>[a-z][a-z0-9_-]{0,63})(?:@(?P<version>[1-9][0-9]{0,5}))?$")
_PLACEHOLDER = re.compile(r"\{(question|passages|no_answer)\}")
_REQUIRED_IN_USER = ("{question}", "{passages}")


def _numbered(passages: Sequence[str]) -> str:
    # The local extractive answerer parses exactly this format back, so the prompt any
    # provider sees and the one the extractive default reads are the same text.
    from ledgerlens.services.inference.providers.extractive import format_passages

    return format_passages(list(enumerate(passages, start=1)))


#: passage formats a template may name: passage texts (number = position + 1) -> text
PASSAGE_FORMATS: Mapping[str, Callable[[Sequence[str]], str]] = {"numbered": _numbered}


class TemplateError(ValueError):
    """A template file is malformed (a packaging bug: raised at load, not per request)."""


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    version: int
    description: str
    system: str
    user: str
    passage_format: str
    #: the exact reply for "the passages do not answer the question"
    no_answer: str
    #: the answer when retrieval found no passage (given without calling a provider)
    no_passages: str

    @property
    def ref(self) -> str:
        """``name@version``, as reported in ``AnswerResponse.template``."""
        return f"{self.name}@{self.version}"

    def format_passages(self, passages: Sequence[str]) -> str:
        """The passages block of the prompt; passage ``n`` is ``passages[n - 1]``."""
        return PASSAGE_FORMATS[self.passage_format](passages)

    def render(self, question: str, passages: Sequence[str]) -> list[Message]:
        """The system and user messages for ``question`` over ``passages`` (numbered from
        1 in the given order). Each placeholder is replaced once, in one pass, so a
        question or passage that contains ``{passages}`` stays literal text."""
        values = {
            "question": question.strip(),
            "passages": self.format_passages(passages),
            "no_answer": self.no_answer,
        }

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)

        return [
            Message(role="system", content=fill(self.system)),
            Message(role="user", content=fill(self.user)),
        ]

    def is_no_answer(self, answer: str) -> bool:
        """Whether ``answer`` is this template's "the passages do not answer" (or "no
        passages") reply, case, whitespace, markers and final punctuation aside."""
        text = _normalise(answer)
        return any(text.startswith(_normalise(s)) for s in (self.no_answer, self.no_passages))


def _normalise(text: str) -> str:
    text = re.sub(r"\[\s*\d+(?:\s*,\s*\d+)*\s*\]", " ", text)
    return " ".join(text.lower().split()).rstrip(" .!")


def parse_template(filename: str, data: Mapping[str, Any]) -> Template:
    """A :class:`Template` from a file's name and parsed TOML, validated."""
    match = _FILE.match(filename)
    if match is None:
        raise TemplateError(f"{filename}: a template file is named <name>@<version>.toml")

    def text(key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"{filename}: `{key}` must be a non-empty string")
        return value.strip()

    name, version = data.get("name"), data.get("version")
    if name != match["name"] or version != int(match["version"]):
        raise TemplateError(
            f"{filename}: name/version inside ({name!r}, {version!r}) disagree with the file name"
        )
    template = Template(
        name=match["name"],
        version=int(match["version"]),
        description=str(data.get("description", "")).strip(),
        system=text("system"),
        user=text("user"),
        passage_format=text("passage_format"),
        no_answer=text("no_answer"),
        no_passages=text("no_passages"),
    )
    if template.passage_format not in PASSAGE_FORMATS:
        raise TemplateError(
            f"{filename}: unknown passage_format {template.passage_format!r} "
            f"(known: {', '.join(sorted(PASSAGE_FORMATS))})"
        )
    missing = [p for p in _REQUIRED_IN_USER if p not in template.user]
    if missing:
        raise TemplateError(f"{filename}: `user` lacks {', '.join(missing)}")
    return template


class TemplateRegistry:
    """Every version of every template of one prompts directory."""

    def __init__(self, templates: Iterable[Template], default: str = DEFAULT_TEMPLATE) -> None:
        self._versions: dict[str, dict[int, Template]] = {}
        for template in templates:
            versions = self._versions.setdefault(template.name, {})
            if template.version in versions:
                raise TemplateError(f"duplicate template {template.ref}")
            versions[template.version] = template
        if default not in self._versions:
            raise TemplateError(f"the default template {default!r} is missing")
        self.default = default

    @classmethod
    def load(cls, directory: Traversable, default: str = DEFAULT_TEMPLATE) -> TemplateRegistry:
        """Load ``<name>@<version>.toml`` files of ``directory`` (other files are ignored)."""
        templates = []
        for entry in directory.iterdir():
            if entry.is_file() and entry.name.endswith(".toml"):
                try:
                    data = tomllib.loads(entry.read_text(encoding="utf-8"))
                except tomllib.TOMLDecodeError as exc:
                    raise TemplateError(f"{entry.name}: {exc}") from exc
                templates.append(parse_template(entry.name, data))
        return cls(templates, default)

    def refs(self) -> list[str]:
        """Every ``name@version``, sorted."""
        return sorted(t.ref for versions in self._versions.values() for t in versions.values())

    def get(self, ref: str = "") -> Template:
        """The template ``ref`` names: ``""`` (default, latest), ``name`` (latest) or
        ``name@version``. Unknown or malformed: ``InvalidArgument`` on ``template``."""
        ref = ref.strip() or self.default
        match = _REF.match(ref)
        versions = self._versions.get(match["name"]) if match else None
        if match is None or versions is None:
            raise self._unknown(ref)
        if match["version"] is None:
            return versions[max(versions)]
        template = versions.get(int(match["version"]))
        if template is None:
            raise self._unknown(ref)
        return template

    def _unknown(self, ref: str) -> InvalidArgument:
        known = ", ".join(self.refs())
        return InvalidArgument(
            f"unknown prompt template {ref[:80]!r}",
            [("template", f"must be a template name, optionally @version; known: {known}")],
            reason="UNKNOWN_TEMPLATE",
        )


@functools.cache
def default_registry() -> TemplateRegistry:
    """The templates shipped in this package (``prompts/``), loaded once."""
    return TemplateRegistry.load(resources.files("ledgerlens.services.inference") / "prompts")


def get(ref: str = "") -> Template:
    """A shipped template by ``name`` or ``name@version`` (see :meth:`TemplateRegistry.get`)."""
    return default_registry().get(ref)

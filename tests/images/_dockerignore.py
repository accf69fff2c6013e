"""`.dockerignore` matching with Docker's own rules (moby/patternmatcher).

A pattern is a cleaned, root-relative path where ``*`` and ``?`` stay inside one path
segment and ``**`` spans any number of them; ``!`` makes it an exception. Every pattern
is tried against the path and against each of its parent directories, and the last
pattern that matches decides, so ``**`` followed by ``!libs/*/src`` sends everything
below ``libs/<x>/src`` and nothing else.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DockerIgnore"]


@dataclass(frozen=True)
class _Pattern:
    text: str
    regex: re.Pattern[str]
    exclusion: bool


def _compile(pattern: str) -> re.Pattern[str]:
    out = "^"
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                    out += "(.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i)
            if end == -1:
                out += re.escape(char)
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out += f"[{body}]"
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + "$")


class DockerIgnore:
    """The patterns of one `.dockerignore` file."""

    def __init__(self, text: str) -> None:
        self.patterns: list[_Pattern] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            cleaned = posixpath.normpath(line).lstrip("/")
            if cleaned in ("", "."):
                continue
            self.patterns.append(_Pattern(line, _compile(cleaned), exclusion))

    @classmethod
    def from_file(cls, path: Path) -> DockerIgnore:
        return cls(path.read_text())

    def excluded(self, path: str) -> bool:
        """True if the root-relative ``path`` (file or directory) is left out."""
        path = posixpath.normpath(path).lstrip("/")
        parts = path.split("/")
        parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        matched = False
        for pattern in self.patterns:
            hit = bool(pattern.regex.match(path)) or any(
                pattern.regex.match(parent) for parent in parents
            )
            if hit:
                matched = not pattern.exclusion
        return matched

    def sent_files(self, root: Path, source: str) -> list[str]:
        """The files under ``root/source`` (or that file) a build context would carry."""
        base = root / source
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        relative = (p.relative_to(root).as_posix() for p in files)
        return [path for path in relative if not self.excluded(path)]

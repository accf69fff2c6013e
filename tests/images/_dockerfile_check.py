"""Static checks of a Dockerfile, on dockerfile-parse's reading of it.

``check_dockerfile(text)`` returns one message per problem (empty: none). It knows no
service; what one service's image must say (its module, ports) is checked in
``test_dockerfiles.py`` on the stages ``parse_stages`` returns.
"""

from __future__ import annotations

import io
import json
import re
import shlex
from dataclasses import dataclass, field

from dockerfile_parse import DockerfileParser

__all__ = ["Instruction", "Stage", "check_dockerfile", "parse_stages", "resolve"]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    image: str  # the FROM image with the global ARG defaults substituted
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


_VAR = re.compile(r"\$(?:\{(\w+)(?::?-([^}]*))?\}|(\w+))")


def resolve(value: str, args: dict[str, str]) -> str:
    """Substitute ``$X``, ``${X}`` and ``${X:-default}`` from ``args``."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        return args.get(name, match.group(2) or "")

    return _VAR.sub(one, value)


def _arg_pairs(value: str) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = []
    for word in shlex.split(value):
        name, eq, default = word.partition("=")
        pairs.append((name, default if eq else None))
    return pairs


def _env_pairs(value: str) -> list[tuple[str, str]]:
    words = shlex.split(value)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value with spaces
        return [(words[0], " ".join(words[1:]))]
    return [(name, val) for name, _, val in (w.partition("=") for w in words)]


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the build stages of a Dockerfile, in order."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()), env_replace=False)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        keyword = item["instruction"].upper()
        if keyword == "COMMENT":
            continue
        value = item["value"]
        if keyword == "FROM":
            words = value.split()
            image = resolve(words[0], global_args) if words else ""
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, item["startline"] + 1))
        elif not stages:
            if keyword == "ARG":
                for arg, default in _arg_pairs(value):
                    global_args[arg] = default or ""
        else:
            stages[-1].instructions.append(Instruction(keyword, value, item["startline"] + 1))
    return global_args, stages


# --- what the checks look for ---------------------------------------------------------

_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# a full version: three numeric components (3.11.11, 1.25.3-alpine); 3.11 or 3 float
_EXACT_TAG = re.compile(r"^v?\d+\.\d+\.\d+")
_ROOT_USERS = {"root", "0"}
_SECRET_NAME = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|(^|_)KEY($|_)|API_?KEY|PRIVATE|CREDENTIAL", re.IGNORECASE
)
_SECRET_FILE = re.compile(
    r"(^|/)(\.env(\..*)?|id_(rsa|dsa|ecdsa|ed25519)|\.netrc|\.npmrc|\.pypirc|credentials"
    r"(\.json)?)$|\.(pem|key|p12|pfx|jks|keystore)$",
    re.IGNORECASE,
)
_INSTALLERS = re.compile(r"\b(apt-get|apt|apk|yum|dnf|microdnf)\b[^;&|]*\b(install|add)\b")
_COMPILERS = re.compile(
    r"(?<![\w.-])(gcc|g\+\+|cc|c\+\+|clang|clang\+\+|build-essential|gfortran|cpp|"
    r"make|cmake|rustc|cargo|golang|musl-dev|libc6?-dev)(-[\d.]+)?(?![\w.+-])"
)
_TOOLCHAIN_PATH = re.compile(r"/usr/(local/)?(bin/(gcc|g\+\+|cc|c\+\+|clang|cpp|ld|as)|lib/gcc)")
_SOURCE_COPY = re.compile(r"(^|\s)(\.|\./|(\S*/)?src/?|\S*\.py)(\s|$)")
_DEPS_INSTALL = re.compile(r"\b(pip|uv pip|uv|poetry)\b[^;&|]*\b(install|sync)\b")


def _image_problems(stage: Stage, stage_names: set[str]) -> list[str]:
    image = stage.image
    if image in stage_names or image == "scratch":
        return []
    where = f"line {stage.line}: FROM {image or '(nothing)'}"
    if _DIGEST.search(image):
        return []
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag at all (a ':' of a registry port is not one)
        return [f"{where}: no tag (means latest); pin an exact version tag or a digest"]
    if tag == "latest":
        return [f"{where}: the 'latest' tag; pin an exact version tag or a digest"]
    if not _EXACT_TAG.match(tag):
        return [f"{where}: tag {tag!r} is not an exact version (x.y.z) nor a digest"]
    return []


def _final_stage_problems(final: Stage) -> list[str]:
    problems: list[str] = []
    users = final.all("USER")
    if not users:
        problems.append("final stage: no USER, so the container runs as root")
    else:
        user = users[-1].value.split(":")[0].strip()
        if user in _ROOT_USERS:
            problems.append(f"line {users[-1].line}: final stage runs as root (USER {user})")
    repo = final.image.split("@")[0].rpartition(":")[0].rsplit("/", 1)[-1]
    tag = final.image.split("@")[0].rpartition(":")[2]
    if repo == "python" and not re.search(r"slim|alpine", tag):
        problems.append(f"line {final.line}: final stage on {final.image}, a full image with gcc")
    for ins in final.all("RUN"):
        if _INSTALLERS.search(ins.value) and (found := _COMPILERS.search(ins.value)):
            problems.append(f"line {ins.line}: final stage installs a compiler ({found.group(0)})")
    for ins in final.all("COPY"):
        if "--from" in ins.value and _TOOLCHAIN_PATH.search(ins.value):
            problems.append(f"line {ins.line}: final stage copies a toolchain in: {ins.value}")
    entrypoints = final.all("ENTRYPOINT")
    if not entrypoints:
        problems.append("final stage: no ENTRYPOINT")
    elif not entrypoints[-1].value.lstrip().startswith("["):
        problems.append(
            f"line {entrypoints[-1].line}: ENTRYPOINT in shell form (the process would not "
            "be PID 1 and would miss SIGTERM); use the exec form [...]"
        )
    return problems


def _secret_problems(stage: Stage) -> list[str]:
    problems: list[str] = []
    for ins in stage.instructions:
        if ins.keyword == "ENV":
            pairs: list[tuple[str, str | None]] = list(_env_pairs(ins.value))
        elif ins.keyword == "ARG":
            pairs = _arg_pairs(ins.value)
        else:
            pairs = []
        for name, value in pairs:
            if value and _SECRET_NAME.search(name):
                problems.append(f"line {ins.line}: {ins.keyword} {name} holds a secret value")
        if ins.keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
            for source in words[:-1]:
                if _SECRET_FILE.search(source.rstrip("/")):
                    problems.append(f"line {ins.line}: {ins.keyword} of a secret file {source}")
    return problems


def _layer_order_problems(stage: Stage) -> list[str]:
    """Dependencies are installed before the first source COPY, so a code edit reuses
    the (slow) dependency layer."""
    for ins in stage.instructions:
        if ins.keyword == "RUN" and _DEPS_INSTALL.search(ins.value):
            return []
        if ins.keyword in ("COPY", "ADD") and "--from" not in ins.value:
            words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
            if any(_SOURCE_COPY.search(w) for w in words[:-1]):
                return [
                    f"line {ins.line}: source copied ({ins.value}) before the dependencies "
                    "are installed; copy the requirements/pyproject files and install first"
                ]
    return []


def check_dockerfile(text: str) -> list[str]:
    """Every problem found in the Dockerfile ``text``; an empty list means none."""
    global_args, stages = parse_stages(text)
    if not stages:
        return ["no FROM instruction"]
    problems: list[str] = []
    names = {s.name for s in stages if s.name}
    for name, default in global_args.items():
        if default and _SECRET_NAME.search(name):
            problems.append(f"global ARG {name} holds a secret value")
    for stage in stages:
        problems += _image_problems(stage, names)
        problems += _secret_problems(stage)
        problems += _layer_order_problems(stage)
    problems += _final_stage_problems(stages[-1])
    return problems


def exec_form(value: str) -> list[str]:
    """The argv of an exec-form ENTRYPOINT/CMD (``[]`` for the shell form)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return []
    return [str(word) for word in parsed] if isinstance(parsed, list) else []

"""The checker itself: a good Dockerfile passes, each kind of bad one is reported."""

from __future__ import annotations

import pytest
from _dockerfile_check import check_dockerfile

GOOD = """\
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS builder
COPY requirements.txt .
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt
COPY src /app/src
FROM ${PYTHON_IMAGE}
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["python", "-m", "app"]
"""


def bad(old: str, new: str) -> list[str]:
    assert old in GOOD
    return check_dockerfile(GOOD.replace(old, new))


def test_a_good_dockerfile_passes() -> None:
    assert check_dockerfile(GOOD) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("USER 10001:10001", "USER root", "runs as root"),
        ("USER 10001:10001", "USER 0:0", "runs as root"),
        ("USER 10001:10001\n", "", "no USER"),
        ("python:3.11.11-slim-bookworm", "python:latest", "'latest'"),
        ("python:3.11.11-slim-bookworm", "python", "no tag"),
        ("python:3.11.11-slim-bookworm", "python:3.11-slim", "not an exact version"),
        ("FROM ${PYTHON_IMAGE}\n", "FROM python:3.11.11-bookworm\n", "full image with gcc"),
        (
            "USER 10001",
            "RUN apt-get update && apt-get install -y --no-install-recommends gcc\nUSER 10001",
            "installs a compiler (gcc)",
        ),
        (
            "USER 10001",
            "RUN apt-get install -y build-essential\nUSER 10001",
            "installs a compiler (build-essential)",
        ),
        ("USER 10001", "RUN apk add --no-cache clang\nUSER 10001", "installs a compiler (clang)"),
        (
            "USER 10001",
            "COPY --from=builder /usr/bin/gcc /usr/bin/gcc\nUSER 10001",
            "copies a toolchain",
        ),
        ("USER 10001", "ENV PASSWORD=hunter2\nUSER 10001", "ENV PASSWORD holds a secret"),
        ("USER 10001", "ENV DB_PASSWORD hunter2\nUSER 10001", "ENV DB_PASSWORD holds a secret"),
        ("USER 10001", "ARG GITHUB_TOKEN=ghp_x\nUSER 10001", "ARG GITHUB_TOKEN holds a secret"),
        ("USER 10001", "ENV API_KEY=abc\nUSER 10001", "ENV API_KEY holds a secret"),
        ("ARG PYTHON_IMAGE", "ARG SECRET_KEY=x\nARG PYTHON_IMAGE", "global ARG SECRET_KEY"),
        ("USER 10001", "COPY .env /app/.env\nUSER 10001", "secret file .env"),
        ("USER 10001", "COPY certs/server.pem /etc/\nUSER 10001", "secret file certs/server.pem"),
        ("USER 10001", "COPY id_rsa /root/.ssh/\nUSER 10001", "secret file id_rsa"),
        ("COPY requirements.txt .\n", "COPY . .\n", "before the dependencies"),
        ("COPY src /app/src\n", "", None),  # only a deps layer: still fine
        ('ENTRYPOINT ["python", "-m", "app"]', "ENTRYPOINT python -m app", "shell form"),
        ('ENTRYPOINT ["python", "-m", "app"]\n', "", "no ENTRYPOINT"),
    ],
)
def test_each_problem_is_reported(old: str, new: str, expected: str | None) -> None:
    problems = bad(old, new)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_source_before_deps_is_reported() -> None:
    text = GOOD.replace(
        "COPY requirements.txt .\nRUN", "COPY src /app/src\nCOPY requirements.txt .\nRUN"
    )
    assert any("source copied (src /app/src)" in p for p in check_dockerfile(text))


def test_every_problem_of_one_bad_dockerfile_is_reported() -> None:
    text = """\
FROM python:latest
ENV PASSWORD=hunter2
COPY . /app
RUN pip install -r /app/requirements.txt
RUN apt-get update && apt-get install -y gcc g++
USER root
CMD python -m app
"""
    problems = "\n".join(check_dockerfile(text))
    for expected in (
        "'latest'",
        "ENV PASSWORD holds a secret",
        "before the dependencies",
        "installs a compiler (gcc)",
        "runs as root",
        "no ENTRYPOINT",
    ):
        assert expected in problems


def test_a_digest_pins_and_a_stage_name_is_no_image() -> None:
    digest = "python@sha256:" + "a" * 64
    text = GOOD.replace("python:3.11.11-slim-bookworm", digest)
    assert check_dockerfile(text) == []
    assert check_dockerfile(f"FROM {digest} AS base\nFROM base\nUSER 1\nENTRYPOINT []\n") == []


def test_no_from_is_reported() -> None:
    assert check_dockerfile("# nothing\n") == ["no FROM instruction"]

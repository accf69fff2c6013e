"""What ``make up`` prints for the first API key works as printed: run on a fresh data
dir, the create-key line makes a key that identity's token endpoint accepts."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ledgerlens.runtime.devstack import FIRST_KEY_SCOPES, first_key_help

pytestmark = pytest.mark.integration


def _command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("  ")]


def test_default_data_dir_needs_no_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    create, login, status = _command_lines(first_key_help(tmp_path / ".data"))
    assert create.split()[0].endswith("python") or "python" in Path(create.split()[0]).name
    assert "LEDGERLENS_IDENTITY_DATABASE_URL" not in create
    assert login.split()[1:3] == ["login", "--client-id"]
    assert status.endswith(" status")


def test_printed_create_key_line_makes_a_working_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    data_dir.mkdir()
    create, _, _ = _command_lines(first_key_help(data_dir))
    words = shlex.split(create)
    env = dict(os.environ)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert env["LEDGERLENS_IDENTITY_DATABASE_URL"].endswith(f"{data_dir}/identity.db")
    words[0] = sys.executable  # the same interpreter the help names, absolute here
    done = subprocess.run(
        words,
        env=env | {"COLUMNS": "500", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = dict(line.split(":", 1) for line in done.stdout.splitlines() if line.count(":") >= 1)
    assert printed["client_id"].strip()
    assert printed["client_secret"].strip()
    # the key landed in the database the running stack's identity reads, with every scope
    with sqlite3.connect(data_dir / "identity.db") as db:
        row = db.execute(
            "SELECT tenant_id, scopes FROM api_keys WHERE key_id = ?",
            (printed["client_id"].strip(),),
        ).fetchone()
    assert row is not None
    assert row[0] == "acme"
    assert sorted(json.loads(row[1])) == sorted(FIRST_KEY_SCOPES)

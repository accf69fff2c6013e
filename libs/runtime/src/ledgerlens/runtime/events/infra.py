"""Write or check ``infra/nats/``: the platform's streams and consumers as JSON files.

    python -m ledgerlens.runtime.events.infra            # (re)write infra/nats
    python -m ledgerlens.runtime.events.infra --check    # exit 1 if it drifted

One file per stream (``streams/<NAME>.json``) and per consumer
(``consumers/<STREAM>/<durable>.json``), in the JetStream API JSON that
``nats stream add --config`` and ``nats consumer add --config`` read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ledgerlens.runtime.events.specs import CONSUMERS, STREAMS, ConsumerSpec, StreamSpec

__all__ = ["expected_files", "infra_drift", "render", "write_infra"]


def render(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def expected_files(
    streams: Iterable[StreamSpec] | None = None,
    consumers: Iterable[ConsumerSpec] | None = None,
) -> dict[str, str]:
    """Relative path -> file content, for every declared stream and consumer."""
    files: dict[str, str] = {}
    for stream in streams if streams is not None else STREAMS.values():
        files[f"streams/{stream.name}.json"] = render(stream.to_json())
    for consumer in consumers if consumers is not None else CONSUMERS:
        files[f"consumers/{consumer.stream}/{consumer.durable}.json"] = render(consumer.to_json())
    return files


def _existing(root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for sub in ("streams", "consumers"):
        for path in sorted((root / sub).rglob("*.json")):
            found[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
    return found


def infra_drift(root: Path) -> list[str]:
    """What differs between ``root`` and the declarations (empty when in sync)."""
    want, have = expected_files(), _existing(root)
    problems = [f"missing {p}" for p in sorted(want.keys() - have.keys())]
    problems += [f"not declared in code: {p}" for p in sorted(have.keys() - want.keys())]
    problems += [f"differs: {p}" for p in sorted(want.keys() & have.keys()) if want[p] != have[p]]
    return problems


def write_infra(root: Path) -> None:
    want = expected_files()
    for relative in _existing(root).keys() - want.keys():
        (root / relative).unlink()
    for relative, content in want.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("root", nargs="?", default="infra/nats", type=Path)
    parser.add_argument("--check", action="store_true", help="only report drift")
    args = parser.parse_args(argv)
    if args.check:
        problems = infra_drift(args.root)
        for problem in problems:
            print(f"{args.root}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    write_infra(args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

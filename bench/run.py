"""Run every benchmark module in bench/ (each exposes ``main() -> dict``); print one JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    results: dict[str, object] = {}
    for path in sorted(HERE.glob("*.py")):
        # load.py is `make load` (drives a whole stack for minutes), not part of `make bench`
        if path.name in ("run.py", "load.py") or path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        results[path.stem] = module.main()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

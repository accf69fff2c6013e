"""Generate the Python contracts from protos/ into libs/contracts/src (`make protos`).

    python libs/contracts/generate.py           regenerate, removing stale files
    python libs/contracts/generate.py --check   exit 1 if the committed tree drifted

Every ``.proto`` under ``protos/`` goes through grpcio-tools' protoc (with its bundled
well-known types) and four generators: ``--python_out``, ``--grpc_python_out``,
``--mypy_out`` and ``--mypy_grpc_out`` (mypy-protobuf's plugins from the virtualenv's
bin directory). Generated modules keep the proto package path
(``ledgerlens.identity.v1.identity_pb2``); ``ledgerlens/`` and the directories below it
stay PEP 420 namespace packages (no ``__init__.py``), and each top-level contract
package gets a ``py.typed`` so mypy reads the generated stubs of an installed copy.

The output is a pure function of the protos and the pinned generator versions, so
``--check`` regenerates into a temporary directory and compares it byte for byte with
the committed tree.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
OUT_ROOT = REPO_ROOT / "libs" / "contracts" / "src"
NAMESPACE = "ledgerlens"


def _grpc_tools_dir() -> Path:
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:
        raise SystemExit("generate.py: grpcio-tools is not installed (run `make setup`)")
    return Path(spec.origin).parent


# The well-known types (google/protobuf/*.proto) bundled with grpcio-tools.
WELL_KNOWN_INCLUDE = _grpc_tools_dir() / "_proto"
# Not resolved: the venv's python is a symlink, and its bin dir is the one we want.
VENV_BIN = Path(sys.executable).parent
IGNORED_PARTS = {"__pycache__"}


def proto_files(proto_root: Path) -> list[str]:
    """All .proto files under proto_root, as sorted root-relative POSIX paths."""
    return sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))


def plugin(name: str) -> Path:
    path = VENV_BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise SystemExit(f"generate.py: protoc plugin {name} not found in {VENV_BIN}")
        path = Path(found)
    return path


def generate(proto_root: Path, out_root: Path) -> None:
    """Run protoc on every proto under proto_root, writing into out_root."""
    files = proto_files(proto_root)
    if not files:
        raise SystemExit(f"generate.py: no .proto files under {proto_root}")
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={WELL_KNOWN_INCLUDE}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *files,
    ]
    result = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"generate.py: protoc failed with exit code {result.returncode}")
    namespace_dir = out_root / NAMESPACE
    if (namespace_dir / "__init__.py").exists():
        raise SystemExit(f"generate.py: {namespace_dir}/__init__.py must not exist (PEP 420)")
    for package_dir in sorted(p for p in namespace_dir.iterdir() if p.is_dir()):
        (package_dir / "py.typed").write_bytes(b"")


def tree(root: Path) -> dict[str, Path]:
    """Generated files under root/ledgerlens, keyed by root-relative POSIX path."""
    base = root / NAMESPACE
    if not base.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p
        for p in sorted(base.rglob("*"))
        if p.is_file()
        and not IGNORED_PARTS.intersection(p.relative_to(root).parts)
        and p.suffix != ".pyc"
    }


def drift(expected_root: Path, actual_root: Path) -> tuple[list[str], list[str], list[str]]:
    """(missing, extra, different) files of actual_root compared with expected_root."""
    expected, actual = tree(expected_root), tree(actual_root)
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    different = sorted(
        name
        for name in expected.keys() & actual.keys()
        if not filecmp.cmp(expected[name], actual[name], shallow=False)
    )
    return missing, extra, different


def sync(fresh_root: Path, out_root: Path) -> list[str]:
    """Make out_root's generated tree equal fresh_root's; return what changed."""
    missing, extra, different = drift(fresh_root, out_root)
    for name in missing + different:
        target = out_root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fresh_root / name, target)
    for name in extra:
        (out_root / name).unlink()
    # Drop directories emptied by removals (and their stale bytecode caches).
    base = out_root / NAMESPACE
    for directory in sorted((d for d in base.rglob("*") if d.is_dir()), reverse=True):
        if not directory.exists():
            continue
        remaining = [p for p in directory.iterdir() if p.name not in IGNORED_PARTS]
        if not remaining:
            shutil.rmtree(directory)
    return [f"+ {n}" for n in missing] + [f"~ {n}" for n in different] + [f"- {n}" for n in extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the generated tree differs from the protos",
    )
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    proto_root, out_root = args.protos.resolve(), args.out.resolve()

    with tempfile.TemporaryDirectory(prefix="ledgerlens-protos-") as tmp:
        fresh = Path(tmp)
        generate(proto_root, fresh)
        if args.check:
            missing, extra, different = drift(fresh, out_root)
            if not (missing or extra or different):
                print(f"generated contracts in sync with {len(proto_files(proto_root))} protos")
                return 0
            for label, names in (
                ("missing", missing),
                ("extra", extra),
                ("different", different),
            ):
                for name in names:
                    print(f"drift: {label}: {out_root / name}")
            print("generated contracts drifted from protos/: run `make protos`", file=sys.stderr)
            return 1
        changes = sync(fresh, out_root)
    for change in changes:
        print(change)
    print(f"generated {len(proto_files(proto_root))} protos into {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Contract tests: the protos, the generated code and the policies they carry."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor

from ledgerlens.events.v1 import events_pb2
from ledgerlens.inference.v1 import inference_pb2
from ledgerlens.options.v1 import auth_pb2, event_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
CONTRACTS_SRC = REPO_ROOT / "libs" / "contracts" / "src"
GENERATOR = REPO_ROOT / "libs" / "contracts" / "generate.py"
BUF = Path(sys.executable).parent / "buf"

PROTO_FILES = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))

# The RPC sets the architecture and issues #3-#9 rely on (more are allowed).
REQUIRED_RPCS = {
    "ledgerlens.identity.v1.IdentityService": {
        "CreateApiKey", "ListApiKeys", "RevokeApiKey", "IssueToken", "GetJwks",
        "Introspect", "RotateSigningKey", "EnrollCertificate", "RevokeCertificate", "GetCrl",
    },
    "ledgerlens.ingestion.v1.IngestionService": {
        "IngestDocument", "IngestStream", "GetDocument", "ListDocuments", "DeleteDocument",
    },
    "ledgerlens.retrieval.v1.RetrievalService": {
        "Search", "SearchStream", "BatchSearch", "GetChunk",
    },
    "ledgerlens.inference.v1.InferenceService": {
        "Chat", "ChatStream", "Embed", "Moderate", "Answer", "AnswerStream", "GetUsage",
    },
    "ledgerlens.ledger.v1.LedgerService": {
        "SubmitTransaction", "EvaluateTransaction", "GetCommitStatus", "StreamEvents",
        "AnchorDocument", "VerifyDocument",
    },
}  # fmt: skip

# Callable without a token; anything else public is a security bug.
PUBLIC_RPCS = {
    "ledgerlens.identity.v1.IdentityService.IssueToken",
    "ledgerlens.identity.v1.IdentityService.GetJwks",
    "ledgerlens.identity.v1.IdentityService.GetCrl",
    "ledgerlens.identity.v1.IdentityService.GetCaInfo",
}

# The subjects ARCHITECTURE.md names; the contracts may add more.
ARCHITECTURE_SUBJECTS = {
    "ledgerlens.identity.key.revoked.v1",
    "ledgerlens.ingestion.document.ingested.v1",
    "ledgerlens.ingestion.chunks.embedded.v1",
    "ledgerlens.inference.completion.recorded.v1",
    "ledgerlens.ledger.anchor.committed.v1",
}
SUBJECT_PATTERN = re.compile(r"^ledgerlens\.[a-z][a-z_]*\.[a-z][a-z_]*\.[a-z][a-z_]*\.v1$")


def module_name(proto: str, suffix: str) -> str:
    return proto.removesuffix(".proto").replace("/", ".") + suffix


def load(proto: str, suffix: str = "_pb2") -> ModuleType:
    return importlib.import_module(module_name(proto, suffix))


def all_services() -> list[ServiceDescriptor]:
    services: list[ServiceDescriptor] = []
    for proto in PROTO_FILES:
        descriptor: FileDescriptor = load(proto).DESCRIPTOR
        services.extend(descriptor.services_by_name.values())
    return services


def all_methods() -> list[MethodDescriptor]:
    return [m for service in all_services() for m in service.methods]


def documented_scopes() -> set[str]:
    """The scope list written in auth.proto's comment (the documentation)."""
    text = (PROTO_ROOT / "ledgerlens/options/v1/auth.proto").read_text()
    block = text.split("// The scopes", 1)[1].split("message AuthPolicy", 1)[0]
    return set(re.findall(r"^//\s{2,}([a-z]+(?::[a-z]+)?)\s{2,}\S", block, flags=re.M))


def message_comments(proto_text: str) -> dict[str, str]:
    """Leading comment of each top-level message, by message name."""
    comments: dict[str, str] = {}
    lines = proto_text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^message (\w+) \{", line)
        if not match:
            continue
        block: list[str] = []
        cursor = index - 1
        while cursor >= 0 and lines[cursor].startswith("//"):
            block.insert(0, lines[cursor].removeprefix("//").strip())
            cursor -= 1
        comments[match.group(1)] = "\n".join(block)
    return comments


def run_generator(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of protos/ and the generated tree, free to damage."""
    protos = tmp_path / "protos"
    out = tmp_path / "src"
    shutil.copytree(PROTO_ROOT, protos)
    shutil.copytree(CONTRACTS_SRC, out, ignore=shutil.ignore_patterns("__pycache__"))
    return protos, out


# --- generated code -------------------------------------------------------------------


def test_every_contract_package_is_present() -> None:
    packages = {p.split("/")[1] for p in PROTO_FILES}
    assert {"identity", "ingestion", "retrieval", "inference", "ledger", "events"} <= packages


@pytest.mark.parametrize("proto", PROTO_FILES)
def test_generated_modules_import(proto: str) -> None:
    messages = load(proto)
    grpc_module = load(proto, "_pb2_grpc")
    assert messages.DESCRIPTOR.name == proto
    for service in messages.DESCRIPTOR.services_by_name.values():
        assert hasattr(grpc_module, f"{service.name}Stub")
        assert hasattr(grpc_module, f"{service.name}Servicer")
        assert hasattr(grpc_module, f"add_{service.name}Servicer_to_server")


def test_namespace_layout() -> None:
    namespace = CONTRACTS_SRC / "ledgerlens"
    assert not (namespace / "__init__.py").exists()
    for proto in PROTO_FILES:
        package_dir = namespace / proto.split("/")[1]
        assert (package_dir / "py.typed").is_file()
        stub = CONTRACTS_SRC / module_name(proto, "_pb2").replace(".", "/")
        assert stub.with_suffix(".pyi").is_file()


# --- services and RPCs -----------------------------------------------------------------


def test_required_rpcs_exist() -> None:
    found = {s.full_name: {m.name for m in s.methods} for s in all_services()}
    for service, rpcs in REQUIRED_RPCS.items():
        assert service in found, service
        assert rpcs <= found[service], (service, rpcs - found[service])


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.full_name)
def test_rpc_has_own_request_and_response(method: MethodDescriptor) -> None:
    package = method.containing_service.file.package
    assert method.input_type.full_name == f"{package}.{method.name}Request"
    assert method.output_type.full_name == f"{package}.{method.name}Response"


def test_request_and_response_messages_are_not_shared() -> None:
    inputs = [m.input_type.full_name for m in all_methods()]
    outputs = [m.output_type.full_name for m in all_methods()]
    assert len(set(inputs)) == len(inputs)
    assert len(set(outputs)) == len(outputs)


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.full_name)
def test_rpc_declares_auth_policy(method: MethodDescriptor) -> None:
    options = method.GetOptions()
    assert options.HasExtension(auth_pb2.auth), f"{method.full_name} has no auth policy"
    policy = options.Extensions[auth_pb2.auth]
    if policy.public:
        assert not policy.scopes, f"{method.full_name}: public and scoped"
        assert method.full_name in PUBLIC_RPCS, f"{method.full_name} must not be public"
    else:
        assert policy.scopes, f"{method.full_name}: neither public nor scoped"
        assert set(policy.scopes) <= documented_scopes(), method.full_name


def test_exactly_the_expected_rpcs_are_public() -> None:
    public = {m.full_name for m in all_methods() if m.GetOptions().Extensions[auth_pb2.auth].public}
    assert public == PUBLIC_RPCS


def test_documented_scopes_are_the_ones_used() -> None:
    documented = documented_scopes()
    used = {s for m in all_methods() for s in m.GetOptions().Extensions[auth_pb2.auth].scopes}
    assert {"admin", "ingest:write", "search:read", "inference:invoke", "ledger:submit"} <= used
    assert documented == used


def test_inference_reuses_the_retrieval_filter() -> None:
    field = inference_pb2.AnswerRequest.DESCRIPTOR.fields_by_name["filter"]
    assert field.message_type.full_name == "ledgerlens.retrieval.v1.SearchFilter"


# --- events ----------------------------------------------------------------------------


def event_payloads() -> dict[str, str]:
    """Message name -> subject, from the event_subject option."""
    payloads = {}
    for name, descriptor in events_pb2.DESCRIPTOR.message_types_by_name.items():
        options = descriptor.GetOptions()
        if options.HasExtension(event_pb2.event_subject):
            payloads[name] = options.Extensions[event_pb2.event_subject]
    return payloads


def test_event_subjects_follow_the_naming_scheme() -> None:
    subjects = event_payloads()
    assert set(subjects.values()) >= ARCHITECTURE_SUBJECTS
    assert len(set(subjects.values())) == len(subjects), "two payloads share a subject"
    for name, subject in subjects.items():
        assert SUBJECT_PATTERN.match(subject), (name, subject)


def test_event_comments_name_their_subject() -> None:
    comments = message_comments((PROTO_ROOT / "ledgerlens/events/v1/events.proto").read_text())
    subjects = event_payloads()
    commented = {
        name: match.group(1)
        for name, comment in comments.items()
        if (match := re.search(r"^Subject: (\S+)$", comment, flags=re.M))
    }
    assert commented == subjects


def test_completion_event_carries_hashes_never_text() -> None:
    for message in (events_pb2.CompletionRecorded, events_pb2.AuditCommitted):
        names = set(message.DESCRIPTOR.fields_by_name)
        assert {"prompt_sha256", "answer_sha256"} <= names
        assert not names & {"prompt", "answer", "text", "content", "messages", "query"}


def test_chunk_vectors_are_packed_on_the_wire() -> None:
    chunk = events_pb2.EmbeddedChunk(vector=[1.0, 2.0, 3.0])
    # field 6, wire type 2 (length-delimited, i.e. packed), 12 bytes of floats
    assert chunk.SerializeToString() == b"\x32\x0c" + b"\x00\x00\x80?\x00\x00\x00@\x00\x00@@"


# --- generator drift check -------------------------------------------------------------


def test_check_passes_on_the_committed_tree() -> None:
    result = run_generator("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_on_a_changed_proto(tree_copy: tuple[Path, Path]) -> None:
    protos, out = tree_copy
    assert run_generator("--check", "--protos", protos, "--out", out).returncode == 0
    retrieval = protos / "ledgerlens/retrieval/v1/retrieval.proto"
    retrieval.write_text(
        retrieval.read_text().replace(
            "message GetChunkRequest {",
            "message GetChunkRequest {\n  // Added.\n  bool with_vector = 2;",
        )
    )
    result = run_generator("--check", "--protos", protos, "--out", out)
    assert result.returncode == 1
    assert re.search(r"different: .*/retrieval/v1/retrieval_pb2\.py$", result.stdout, flags=re.M)


def test_check_fails_on_extra_and_missing_files(tree_copy: tuple[Path, Path]) -> None:
    protos, out = tree_copy
    stale = out / "ledgerlens/identity/v1/old_pb2.py"
    stale.write_text("# stale\n")
    (out / "ledgerlens/ledger/v1/ledger_pb2.pyi").unlink()
    result = run_generator("--check", "--protos", protos, "--out", out)
    assert result.returncode == 1
    assert re.search(r"extra: .*/identity/v1/old_pb2\.py$", result.stdout, flags=re.M)
    assert re.search(r"missing: .*/ledger/v1/ledger_pb2\.pyi$", result.stdout, flags=re.M)


def test_regeneration_removes_stale_files(tree_copy: tuple[Path, Path]) -> None:
    protos, out = tree_copy
    (protos / "ledgerlens/events/v1/events.proto").unlink()
    assert run_generator("--check", "--protos", protos, "--out", out).returncode == 1
    result = run_generator("--protos", protos, "--out", out)
    assert result.returncode == 0, result.stderr
    assert not (out / "ledgerlens/events").exists()
    assert (out / "ledgerlens/ledger/v1/ledger_pb2.py").is_file()
    assert run_generator("--check", "--protos", protos, "--out", out).returncode == 0


# --- buf -------------------------------------------------------------------------------


def run_buf_lint(module_root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "lint"],
        cwd=module_root,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_buf_lint_is_clean() -> None:
    result = run_buf_lint(PROTO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_requires_comments(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, protos)
    common = protos / "ledgerlens/common/v1/common.proto"
    common.write_text(common.read_text() + "\nmessage Undocumented {\n  string name = 1;\n}\n")
    result = run_buf_lint(protos)
    assert result.returncode != 0
    assert "Undocumented" in result.stdout
    assert "comment" in result.stdout.lower()

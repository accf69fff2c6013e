# Every developer and CI entry point. A fresh clone needs only `make up` or `make test`:
# both run `setup` first when the virtualenv is missing or the requirements changed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ledgerlens-setup
PYPROJECTS := $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
RUNTIME_SRC := libs/runtime/src/ledgerlens/runtime
SERVICE_SRC := $(wildcard services/*/src/ledgerlens/services/*) libs/cli/src/ledgerlens/cli libs/embedding/src/ledgerlens/embedding libs/fabric/src/ledgerlens/fabric

.PHONY: setup protos fmt lint typecheck test up down bench load eval

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt $(PYPROJECTS)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	touch $@

protos: $(STAMP)
	$(BIN)/python libs/contracts/generate.py

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy $(RUNTIME_SRC) libs/runtime/tests $(SERVICE_SRC)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(RUNTIME_SRC) libs/runtime/tests $(SERVICE_SRC)
	cd protos && ../$(BIN)/buf lint
	$(BIN)/python libs/contracts/generate.py --check
	$(BIN)/python -m ledgerlens.runtime.events.infra --check

test: $(STAMP)
	$(BIN)/pytest

up: $(STAMP)
	$(BIN)/python -m ledgerlens.runtime.devstack up

down: $(STAMP)
	$(BIN)/python -m ledgerlens.runtime.devstack down

bench: $(STAMP)
	@$(BIN)/python bench/run.py

load: $(STAMP)
	@$(BIN)/python bench/load.py $(LOAD_ARGS)

eval: $(STAMP)
	@$(BIN)/python services/retrieval/eval/run.py

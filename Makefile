# Concord: `make demo` runs the main job, `make test` runs every test. Both set up what they
# need on a fresh machine (virtual environment, Python packages, the npm OIDC provider).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

# Flower: no telemetry, no update checks, and never `uv sync` at run time (it would pull a
# multi-GB CUDA torch).
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
# The PostgreSQL tier of the tests (trust auth on the local server).
export CONCORD_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres

PYTEST_ARGS ?=
# checkov (tests/deploy/test_checkov.py) in a venv of its own: its pins clash with ours.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION ?= 3.3.30
DEMO_ARGS ?=

.PHONY: help install demo test check lint format pytest test-fast clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.stamp-python: pyproject.toml benchmarks/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: any other spec may pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e ./benchmarks
	touch $@

tests/oidc_provider/node_modules/.stamp: tests/oidc_provider/package-lock.json
	cd tests/oidc_provider && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CHECKOV_VENV)/.stamp-checkov: Makefile
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

install: $(VENV)/.stamp-python tests/oidc_provider/node_modules/.stamp $(CHECKOV_VENV)/.stamp-checkov ## Create the venvs and install everything

demo: $(VENV)/.stamp-python ## A whole study across three local hospitals (embedded defaults)
	$(BIN)/consortium demo $(DEMO_ARGS)

check: install ## Lint (ruff), type-check (mypy) and check the import contracts (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: check ## Lint, type-check, then every test on SQLite and PostgreSQL
	bash scripts/ensure-postgres.sh
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-tini.sh
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install ## Tests without the slow, integration and PostgreSQL tiers
	$(BIN)/pytest -m "not slow and not integration and not postgres" $(PYTEST_ARGS)

format: install ## Apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove the demo state (keeps the venv)
	rm -rf .concord

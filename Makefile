# mailer — the two commands: `make dev` (run it) and `make test` (test it).
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: dev test lint format typecheck install services browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	@bash scripts/ensure-services.sh

browser:
	@bash scripts/ensure-browser.sh

## Run the service on the embedded defaults: SQLite, SMTP catcher + /dev/inbox, web + worker.
dev: install
	@if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then \
	  export MAILER_REDIS_URL=$${MAILER_REDIS_URL:-redis://127.0.0.1:6379/0}; fi; \
	MAILER_ENV=dev $(BIN)/mailer dev

## Set everything up and run the whole suite (lint, types, tests on SQLite and PostgreSQL).
test: install services browser lint typecheck
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

## Benchmarks: writes docs/benchmarks.md
bench: install services
	@bash bench/run.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

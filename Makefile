# `make repro`: set up and run the pipeline. `make test`: set up, lint, and run the whole test suite (~25 min on
# 2 CPU cores). `make test-fast`: the tests not marked slow (~2 min).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup repro lint test test-fast

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

setup: $(BIN)/.installed

repro: setup
	$(RUN) $(BIN)/dvc repro

lint: setup
	$(BIN)/ruff check .

test: lint
	$(RUN) $(BIN)/python -m pytest

test-fast: lint
	$(RUN) $(BIN)/python -m pytest -m "not slow"

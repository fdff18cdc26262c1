# `make repro`: set up and run the pipeline. `make test`: set up, lint, and run the whole test suite (~18 min on
# 2 CPU cores). `make test-fast`: the tests not marked slow (~1 min). `make gpu-check`: on a CUDA machine, the
# whole pipeline with the default GPU settings on generated data, one PASS/FAIL line per path.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup repro lint test test-fast gpu-check

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

gpu-check: setup
	$(RUN) $(BIN)/python -m benchmarks.gpu_check

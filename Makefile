# `make repro`: set up and run the pipeline. `make test`: set up, lint, and run the whole test suite (26-28 min on
# 2 CPU cores). `make test-fast`: the tests not marked slow (~1 min). `make gpu-check`: on a CUDA machine, the
# whole pipeline with the default GPU settings on generated data, one PASS/FAIL line per path.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"
# Test files run in TEST_JOBS processes (pytest-xdist), each file whole in one of them (its module fixtures are
# built once), in the order tests/conftest.py collects them (longest first; xdist's own order is by test count).
# The slow tests spend much of their time in DVC, git, imports and waits rather than on the cores, so on 2 cores
# the whole suite took 58.7 min in one process and 33.2 in two; three were no faster (over 35; 2026-12-01).
# TEST_JOBS=1: one process.
TEST_JOBS ?= 2
PYTEST := $(BIN)/python -m pytest $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder)

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
	$(RUN) $(PYTEST)

test-fast: lint
	$(RUN) $(PYTEST) -m "not slow"

gpu-check: setup
	$(RUN) $(BIN)/python -m benchmarks.gpu_check

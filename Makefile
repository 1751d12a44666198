# onnxfn: every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup models run test lint typecheck pytest bench bench-events bench-platform clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,models]'
	touch $(STAMP)

models: setup
	$(BIN)/onnxfn build-models

run: models
	$(BIN)/onnxfn up

lint: setup
	$(BIN)/ruff check shared functions tests
	$(BIN)/ruff format --check shared functions tests

typecheck: setup
	$(BIN)/mypy shared

pytest: models
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: models
	$(BIN)/onnxfn bench

bench-events: models
	$(BIN)/onnxfn bench-events

bench-platform: models
	$(BIN)/onnxfn platform-bench

clean:
	rm -rf $(VENV) models .mypy_cache .ruff_cache .pytest_cache

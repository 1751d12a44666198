# onnxfn: every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup lock models chromium promtool run test fault-test lint typecheck pytest hey bench bench-functions bench-events bench-platform image-check clean

setup: $(STAMP)

# The pinned set of requirements/dev.txt (make lock writes it from pyproject.toml), then the
# project itself without resolving anything again.
$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Pinned requirements from pyproject.toml (pip-tools): cpu and gpu are the images' runtime venvs,
# dev is CI's and this Makefile's (with the models' build). Run after changing a dependency.
LOCK := $(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --allow-unsafe
lock: setup
	$(LOCK) --extra cpu -o requirements/cpu.txt pyproject.toml
	$(LOCK) --extra gpu -o requirements/gpu.txt pyproject.toml
	$(LOCK) --extra cpu --extra embedded --extra dev --extra models -o requirements/dev.txt pyproject.toml

models: setup
	$(BIN)/onnxfn build-models

run: models
	$(BIN)/onnxfn up

lint: setup
	$(BIN)/ruff check shared functions tests
	$(BIN)/ruff format --check shared functions tests

typecheck: setup
	$(BIN)/mypy shared

pytest: models chromium promtool
	$(BIN)/pytest -q

# The console's browser test drives Debian's chromium; where apt cannot install it, that test skips.
chromium:
	@command -v chromium >/dev/null || { apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; } || \
		echo "chromium could not be installed: the console's browser test will skip"

# promtool (Debian's prometheus package) checks observability/prometheusrule.yaml; without it that test skips.
promtool:
	@command -v promtool >/dev/null || { apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; } || \
		echo "promtool could not be installed: the alert rules' promtool test will skip"

test: lint typecheck pytest

# The fault, burst and crash tests alone (they are also part of make test).
fault-test: models
	$(BIN)/pytest -q -m fault

# The benchmarks load the servers with hey (Debian's package), an outside load generator.
hey:
	@command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq hey; } || \
		{ echo "the benchmarks need hey: apt-get install hey"; exit 1; }

# onnxfn beside naive Flask, KServe and MLServer (their venvs are made under .bench/ on first use).
bench: models hey
	$(BIN)/onnxfn bench --peers

# digits and embed: raw onnxruntime, the function at c=1/8/32, batched CloudEvents, cold start.
bench-functions: models hey
	$(BIN)/onnxfn bench

bench-events: models
	$(BIN)/onnxfn bench-events

bench-platform: models
	$(BIN)/onnxfn platform-bench

# Build the base stand-in and both image targets with buildah, run the cpu image read-only as
# UID 10001 with podman (needs root and minutes; not part of `make test`). docs/operations.md.
image-check: setup
	PYTHON=$(BIN)/python scripts/image-check.sh

clean:
	rm -rf $(VENV) models .bench .mypy_cache .ruff_cache .pytest_cache

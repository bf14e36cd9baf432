# The two commands of the README. Each sets up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned here so a fresh machine never pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck pytest pytest-inprocess pytest-e2e bench clean

# Byte-compiled once, on every core (pip compiles file by file on one): with
# PYTHONDONTWRITEBYTECODE set, as on CI machines, a module left uncompiled is compiled again by
# every process that imports it. A file some package ships that does not compile is no error here.
$(BIN)/raylens: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile "$(TORCH)"
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(BIN)/raylens

demo: $(BIN)/raylens
	$(BIN)/raylens run examples/digits.yaml

lint: $(BIN)/raylens
	$(BIN)/ruff check raylens tests bench
	$(BIN)/ruff format --check raylens tests bench

typecheck: $(BIN)/raylens
	$(BIN)/mypy

# The in-process tests (one shared Ray cluster) and the tests that drive the CLI in subprocesses
# are two sessions; each prints its slowest tests.
pytest: pytest-inprocess pytest-e2e

pytest-inprocess: $(BIN)/raylens
	$(BIN)/pytest -m "not e2e" --durations=20

pytest-e2e: $(BIN)/raylens
	$(BIN)/pytest -m e2e --durations=10

# The type check and both test sessions run side by side, each target's output printed whole
# when it ends: on 2 cores they mostly wait (on Ray's and MLflow's start-up, on subprocesses),
# and together they take about two thirds of the time one after the other.
test: lint
	$(MAKE) --no-print-directory -j3 --output-sync=target typecheck pytest-inprocess pytest-e2e

bench: $(BIN)/raylens
	$(BIN)/python -m bench trainer --json
	$(BIN)/python -m bench startup --json

clean:
	rm -rf raylens-runs .pytest_cache .mypy_cache .ruff_cache

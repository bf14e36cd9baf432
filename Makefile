# The two commands of the README. Each sets up .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned here so a fresh machine never pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck pytest bench clean

# Byte-compiled once, on every core (pip compiles file by file on one): with
# PYTHONDONTWRITEBYTECODE set, as on CI machines, a module left uncompiled is compiled again by
# every process that imports it. A file some package ships that does not compile is no error here.
# Installed with uv (downloads side by side; a fresh venv in about two thirds of pip's time),
# told where pip is told to find wheels (PIP_FIND_LINKS: the CPU wheel of torch) and which CA
# certificates to trust; with pip where uv cannot be had or cannot reach its index.
UV_ENV := $(if $(PIP_FIND_LINKS),UV_FIND_LINKS="$(PIP_FIND_LINKS)") $(if $(PIP_CERT),SSL_CERT_FILE="$(PIP_CERT)")

$(BIN)/raylens: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	($(BIN)/pip install -q uv && $(UV_ENV) $(BIN)/uv pip install -q --python $(BIN)/python "$(TORCH)" -e ".[dev]") \
		|| ($(BIN)/pip install -q --no-compile "$(TORCH)" && $(BIN)/pip install -q --no-compile -e ".[dev]")
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(BIN)/raylens

demo: $(BIN)/raylens
	$(BIN)/raylens run examples/digits.yaml

lint: $(BIN)/raylens
	$(BIN)/ruff check raylens tests bench
	$(BIN)/ruff format --check raylens tests bench

typecheck: $(BIN)/raylens
	$(BIN)/mypy

# In-process tests first (one shared Ray cluster); then the tests that drive the CLI in
# subprocesses. Not side by side: a job submitted with `--address auto` joins the cluster a
# machine started last, and the in-process tests start clusters of their own.
pytest: $(BIN)/raylens
	$(BIN)/pytest -m "not e2e" --durations=20
	$(BIN)/pytest -m e2e --durations=10

# The type check runs beside the tests: it is one process on one core, the tests mostly wait.
test: lint
	$(MAKE) --no-print-directory -j2 typecheck pytest

bench: $(BIN)/raylens
	$(BIN)/python -m bench trainer --json
	$(BIN)/python -m bench startup --json

clean:
	rm -rf raylens-runs .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make run` and `make test`. Both create .venv with torch pinned (constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: run test test-gpu lint imports typecheck unit clean

$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	touch $@

run: $(VENV)/.base
	$(VENV)/bin/gradzip train

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check gradzip tests tests_gpu
	$(VENV)/bin/ruff format --check gradzip tests tests_gpu

# The layers contract and the no-cycles contract in pyproject.toml ([tool.importlinter]).
imports: $(VENV)/.dev
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy gradzip

unit: $(VENV)/.dev
	$(PY) -m pytest -q

test: lint imports typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache

# On a machine with a CUDA GPU: the hooks on CUDA tensors against the CPU, training on NCCL, the kernels.
test-gpu: $(VENV)/.dev
	$(PY) -m pytest -q -s tests_gpu

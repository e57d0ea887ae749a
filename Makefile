# Two commands on a fresh machine: `make run` and `make test`. Both create .venv with torch pinned (constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: run test lint typecheck unit clean

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
	$(VENV)/bin/ruff check gradzip tests
	$(VENV)/bin/ruff format --check gradzip tests

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy gradzip

unit: $(VENV)/.dev
	$(PY) -m pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

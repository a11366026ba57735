# qft developer commands. `make test` is the README's (and CI's) test command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qft-installed
BENCH_ARGS ?=

.PHONY: setup test bench lint env clean

setup: $(STAMP)

# A venv with pinned CPU dependencies, then qft itself (editable; builds qft._C when nvcc exists).
$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_quant.py $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

env: setup
	$(PY) -m qft env

clean:
	rm -rf build *.egg-info qft/_C*.so .pytest_cache .ruff_cache

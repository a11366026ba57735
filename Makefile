# qft developer commands. `make demo` and `make test` are the README's quick start (CI runs the latter).
# -P keeps the checkout's folder off sys.path, so its kernels/ (installed as qft.kernels) never
# shadows the PyPI package `kernels` that bitsandbytes and transformers probe.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qft-installed
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test bench lint env clean

setup: $(STAMP)

# A venv with pinned CPU dependencies, then qft itself (editable; builds qft._C when nvcc exists).
$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DISABLE_CUDA=1 $(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -P -m qft demo $(DEMO_ARGS)

test: setup
	$(PY) -P -m pytest -q

bench: setup
	$(PY) -P -m qft bench $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

env: setup
	$(PY) -P -m qft env

clean:
	rm -rf build *.egg-info qft/_C*.so .pytest_cache .ruff_cache

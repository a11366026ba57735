# qft developer commands. `make demo` and `make test` are the README's quick start (CI runs the latter).
# -P keeps the checkout's folder off sys.path, so its kernels/ (installed as qft.kernels) never
# shadows the PyPI package `kernels` that bitsandbytes and transformers probe.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qft-installed
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test bench lint env clean compile-check-gpu-triton gpu-check-dry-run

setup: $(STAMP)

# A venv with pinned CPU dependencies, then qft itself (editable; builds qft._C when nvcc exists).
$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard csrc/*) $(wildcard csrc/cpu/*)
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

# Every Triton launch the dispatcher can produce (every format, dtype, option and path; 177 launches)
# compiled for sm_90 with the GPU machine's Triton (3.6; `make test` compiles a quick set with the
# pinned 3.9). A small venv of its own: torch (CPU) + that Triton + qft without the CUDA extension.
GPU_TRITON ?= 3.6.0
GPU_VENV := .venv-triton-$(GPU_TRITON)
compile-check-gpu-triton:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q torch==2.13.0 triton==$(GPU_TRITON) numpy safetensors setuptools wheel pybind11 ninja
	QFT_SKIP_CUDA_BUILD=1 $(GPU_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	env -u TRITON_INTERPRET $(GPU_VENV)/bin/python -P .ci/triton_compile_check.py --dispatch --shard 0/2 & pid=$$!; \
	  env -u TRITON_INTERPRET $(GPU_VENV)/bin/python -P .ci/triton_compile_check.py --dispatch --shard 1/2 || exit 1; \
	  wait $$pid

# benchmarks/gpu_check.sh's stages on CPU (tiny shapes, the interpreter), so the script and the
# suites cannot rot between GPU sessions; then check every stage's files are in what comes back.
DRY_OUT ?= /tmp/qft-gpu-check-dry
gpu-check-dry-run: setup
	rm -rf $(DRY_OUT)
	OUT=$(DRY_OUT) QFT_GPU_WORK=$(DRY_OUT)-work PYTHON=$(PY) bash benchmarks/gpu_check.sh --dry-run
	for stage in install tests quant smallm train e2e adapters optim sanitize paging rest; do \
	  grep -q "^| $$stage | 0 |" $(DRY_OUT)/summary.md || { echo "stage $$stage missing or failed"; exit 1; }; done
	for rows in quant/quant smallm/lowbit train/linear train/lora_gemm e2e/e2e adapters/adapters optim/optim rest/linear; do \
	  tar -xzOf $(DRY_OUT)/results.tgz --wildcards "./$$rows-*.jsonl" | grep -q '"p50_ms"' || { echo "no rows: $$rows"; exit 1; }; done

clean:
	rm -rf build *.egg-info qft/_C*.so .pytest_cache .ruff_cache

#!/usr/bin/env bash
# The GPU check: the one place a session lent a GPU reads to know what to run and what to commit.
#
# Before the device call, here on CPU:
#   ../shared/tools/device-site.sh bitsandbytes==0.50.2 liger-kernel==0.8.5
#                                             # .devsite/: the peer and Liger for the GPU's Python 3.12
#   bash benchmarks/gpu_check.sh --dry-run    # the whole staged run with tiny shapes (CI runs it too)
# Through the device tool (carry [".devsite"], timeout_s 600):
#   bash benchmarks/gpu_check.sh              # every stage, ~9 minutes on an H100/H200
#   bash benchmarks/gpu_check.sh --stage smallm --stage train   # rerun some stages (names below)
# What comes back: $OUT/summary.md (each stage's rc, wall time and table) and $OUT/results.tgz (every
# log, JSON/JSONL/CSV/MD/PNG, re-packed after each stage, so a run cut off at its limit still returns
# every finished stage). Unpack results.tgz into benchmarks/results/gpu-<date>/ and commit it, with
# the suites' <suite>-<gpu>-<date>.{json,md} copied up into benchmarks/results/.
#
# Stages, in order of value (name: budget in seconds; each also stops at the overall deadline,
# QFT_GPU_DEADLINE seconds after the start, default 540):
#   install   build qft._C for sm_90a only, `python -m qft env`, nvidia-smi, measured copy/matmul rates
#   tests     pytest -m gpu in parallel (-n 8, 180 s per test), the paging test excluded
#   quant     NF4 quantize/dequantize vs bitsandbytes (% of measured copy bandwidth)
#   smallm    every format at M = 1, 4, 16 on 8192x28672 vs bf16 cuBLAS and bitsandbytes (eager + CUDA graph),
#             qft's dispatcher choice and each small-M kernel pinned (the chunked GEMV, the fused Triton
#             kernel): the data for qft/ops/thresholds.py
#   train     LoRA/OFT fwd+bwd at M = 8192 on 4096x4096, 14336x4096, 4096x14336 vs PEFT bf16 / bnb; the
#             K + r LoRA GEMMs vs the M x N epilogue they replaced (bench_lora_gemm)
#   e2e       a full Llama-3-8B-shaped model (32 layers, seq 2048, checkpointing, Liger kernels on every
#             stack), one LoRA training step: qft vs bitsandbytes + PEFT vs bf16 PEFT, tokens/s and peak memory
#   adapters  every adapter family (LoRA, OFT, BOFT, DiaBlo, ETHER+, HRA) fwd+bwd at M = 8192 on the train
#             shapes vs qft's QLoRA (goal <= 1.15x) and PEFT's BOFT over bnb / HRA over bf16 (goal >= 3x slower)
#   optim     optimizer step vs torch AdamW and bitsandbytes' paged 8-bit AdamW, page_out's freed bytes
#   sanitize  compute-sanitizer memcheck over a small set of kernel tests
#   paging    the managed-memory paging test, last and alone
#   rest      the rest of the linear grid, FSDP2 on one GPU wrapped vs unwrapped
set -uo pipefail

DRY=0
STAGES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stage) shift; STAGES+=("${1:?--stage needs a name}") ;;
    *) echo "usage: $0 [--dry-run] [--stage NAME]..." >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-/tmp/qft-gpu-check}
WORK=${QFT_GPU_WORK:-/tmp/qft-gpu-work}  # outside $OUT: only summary.md and results.tgz go back
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK"
# benchmarks/ on the path: the suites import their `common` (python -P drops the script folder)
export PYTHONPATH="$PWD/.devsite:$PWD/benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=${QFT_GPU_DEADLINE:-540}

if [ "$DRY" = 1 ]; then
  # CPU: the interpreter, tiny shapes, the CPU providers; the same stages and files.
  PY=${PYTHON:-.venv/bin/python}
  DEVICE=(--device cpu --quick --repeats 1)
  TRAIN_M=128 TRAIN_SHAPES=512x512
  export TRITON_INTERPRET=1
else
  PY=${PYTHON:-python3}
  DEVICE=(--device cuda)
  TRAIN_M=8192 TRAIN_SHAPES=4096x4096,14336x4096,4096x14336
  unset TRITON_INTERPRET
fi
PY=("$PY" -P)  # the checkout's kernels/ must not shadow the PyPI package `kernels`

SUMMARY="$OUT/summary.md"
{
  echo "# qft GPU check, $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ', DRY RUN on CPU')"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
  echo
  echo "| stage | rc | wall s |"
  echo "|---|---|---|"
} > "$SUMMARY"
TABLES="$WORK/tables.md"
FAILED=""
: > "$TABLES"

pack() {
  cp "$SUMMARY" "$WORK/summary.md"
  tar -czf "$OUT/results.tgz.part" -C "$WORK" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}

selected() {
  [ ${#STAGES[@]} -eq 0 ] && return 0
  local s
  for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

# stage NAME BUDGET COMMAND...: run under timeout (the smaller of BUDGET and the time left), log to
# $WORK/NAME.log, append rc and wall time to the summary, the log's tail to the tables, re-pack.
stage() {
  local name=$1 budget=$2; shift 2
  selected "$name" || return 0
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    echo "| $name | not run: deadline | 0 |" >> "$SUMMARY"; FAILED="$FAILED $name"; pack; return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (budget ${budget}s)"
  local t0=$(date +%s)
  timeout -k 10 "$budget" bash -c "$*" > "$WORK/$name.log" 2>&1
  local rc=$?
  local wall=$(( $(date +%s) - t0 ))
  [ "$rc" = 0 ] || FAILED="$FAILED $name"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc (timeout)"
  echo "| $name | $rc | $wall |" >> "$SUMMARY"
  { echo; echo "## $name (rc $rc, ${wall}s)"; echo; echo '```'; tail -n 40 "$WORK/$name.log"; echo '```'; } >> "$TABLES"
  tail -n 5 "$WORK/$name.log"
  pack
}

bench() {  # bench SUITE STAGE ARGS...: one suite's files into $WORK/STAGE (stages never overwrite)
  local suite=$1 dir=$2; shift 2
  echo "${PY[*]} benchmarks/bench_$suite.py ${DEVICE[*]} --out $WORK/$dir $*"
}

# pytest flags the machine has: parallel workers and a per-test timeout where the plugins exist.
PYTEST=("${PY[@]}" -m pytest -q -p no:cacheprovider)
"${PY[@]}" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && PYTEST+=(-n 8)
"${PY[@]}" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 180)
PYTEST_SERIAL=("${PY[@]}" -m pytest -q -p no:cacheprovider)
GPU_TESTS="tests/kernels/test_triton.py tests/kernels/test_gemv_chunked.py tests/ops/test_lora_gemm.py tests/nn/test_fuse.py tests/ops/test_ops.py tests/test_functional.py tests/formats/test_lowbit.py tests/adapters/test_oft.py tests/optim/test_optim.py"
PAGING_TEST="paged_step_matches_cpu"

if [ "$DRY" = 1 ]; then
  INSTALL="echo 'dry run: .venv is the install'; ${PY[*]} -c 'import qft, qft._extension as e; print(e.extension())'"
else
  INSTALL="QFT_CUDA_ARCHS=90a python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -c 'import qft._C'"
fi
stage install 300 "$INSTALL && ${PY[*]} -m qft env; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; ${PY[*]} -c 'import sys; sys.path.insert(0, \"benchmarks\"); import common, json; print(json.dumps(common.device_rates(\"${DEVICE[1]}\")))'"
stage tests 200 "${PYTEST[*]} -m gpu -k 'not $PAGING_TEST' $GPU_TESTS"
stage quant 60 "$(bench quant quant)"
stage smallm 150 "$(bench lowbit smallm)"
stage train 150 "$(bench linear train) --ms $TRAIN_M --shapes $TRAIN_SHAPES && $(bench lora_gemm train)"
stage e2e 240 "$(bench e2e e2e)"
stage adapters 150 "$(bench adapters adapters)"
stage optim 60 "$(bench optim optim)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  stage sanitize 90 "compute-sanitizer --tool memcheck --error-exitcode 1 ${PYTEST_SERIAL[*]} -m gpu -x tests/ops/test_ops.py tests/formats/test_lowbit.py"
else
  stage sanitize 10 "echo 'no compute-sanitizer on this machine: not run'"
fi
stage paging 60 "${PYTEST[*]} -m gpu -k '$PAGING_TEST' tests/optim/test_optim.py"
if [ "$DRY" = 1 ]; then
  FSDP="${PY[*]} benchmarks/fsdp_qlora.py --no-shard --cases nf4:lora --steps 2 --out $WORK/rest/fsdp-single.json"
else
  FSDP="${PY[*]} benchmarks/fsdp_qlora.py --no-shard --cases nf4:lora,nf4:oft --out $WORK/rest/fsdp-single.json; ${PY[*]} -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/fsdp_qlora.py --cases nf4:lora,nf4:oft --out $WORK/rest/fsdp-wrapped.json"
fi
stage rest 600 "mkdir -p $WORK/rest; $FSDP; $(bench linear rest)"

cat "$TABLES" >> "$SUMMARY"
echo >> "$SUMMARY"
echo "total wall $(( $(date +%s) - START )) s" >> "$SUMMARY"
pack
echo "summary: $SUMMARY; results: $OUT/results.tgz"
[ -z "$FAILED" ] || { echo "failed stages:$FAILED"; exit 1; }
exit 0

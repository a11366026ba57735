#!/usr/bin/env bash
# The GPU check for the device machine, in one call: install qft (builds qft._C with its nvcc),
# report the environment, run the gpu-marked tests, run the quant and linear benchmarks against
# bitsandbytes / PEFT / cuBLAS.
# Everything lands in $OUT (the device tool brings it back). Prepare bitsandbytes here first:
#   ../shared/tools/device-site.sh          # makes .devsite/ (bitsandbytes 0.50.2 for the GPU's Python)
# then, through the device tool, with carry [".devsite"]:
#   bash benchmarks/gpu_check.sh
# and commit $OUT's quant-*.{json,csv,md} and linear-*.{json,csv,md} under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/qft-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.devsite:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python3 -m qft env 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/env.txt"

# Only the files with gpu tests: the GPU machine lacks hypothesis, which the property tests need.
python3 -m pytest -q -m gpu tests/test_triton.py tests/test_ops.py tests/test_functional.py tests/test_lowbit.py tests/test_oft.py tests/test_optim.py 2>&1 | tee "$OUT/pytest-gpu.txt"
tests_rc=${PIPESTATUS[0]}

python3 benchmarks/bench_quant.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
python3 benchmarks/bench_linear.py --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
python3 benchmarks/bench_lowbit.py --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
python3 benchmarks/bench_optim.py --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench.txt"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
# FSDP2 on one GPU: the wrapped run must give the unwrapped run's losses.
python3 benchmarks/fsdp_qlora.py --no-shard --cases nf4:lora,nf4:oft --out "$OUT/fsdp-single.json" 2>&1 | tee -a "$OUT/bench.txt"
python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/fsdp_qlora.py --cases nf4:lora,nf4:oft \
    --out "$OUT/fsdp-wrapped.json" 2>&1 | tee -a "$OUT/bench.txt"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
echo "gpu tests rc=$tests_rc, bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))

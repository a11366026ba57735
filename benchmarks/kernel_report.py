"""Static report of the small-M kernels, compiled for sm_90 on a machine without a GPU: a MODEL.

For each kernel x format x M it reports what the compiler made (registers, per-thread local memory:
the stack frame of spills and local arrays, shared memory, from ``cuobjdump -res-usage``) and, from
the SASS (``cuobjdump -sass``, shipped with Triton), the main loop:

* Triton fused matmul (M = 5..16 on GPUs whose thresholds send small M there), for a 128x256 weight
  with blocks of 64 (blocks inside rows, as in real layers: the per-tile decode): the K loop, one
  ``BLOCK_N x BLOCK_K`` weight tile per iteration for ``num_warps x 32`` threads, so
  ``sass_per_weight = loop instructions x threads / (BLOCK_N x BLOCK_K)`` (thread-instructions).
* CUDA chunked decode GEMV (M <= 4; csrc/gemv_core.cuh): one kernel per bit width, code book or
  affine, and M; its K loop decodes one 64-value chunk of 4 weight rows (2 at M >= 3) per lane and
  iteration, so ``sass_per_weight = loop instructions / (64 x rows)``.

``estimate_us`` at 8192x28672, M = 1 is max(bytes / copy bandwidth, weights x sass_per_weight /
(132 SMs x 128 lanes x 1.98 GHz)), against bf16's bytes floor: what the instruction count allows,
not a measurement. Writes ``benchmarks/results/kernels-sm90-<date>.{json,md}``.

    python benchmarks/kernel_report.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, do not interpret

import common
import torch
from sass import loops, res_usage, sass_functions
from triton_launches import compile_launch, record

import qft

ROOT = Path(__file__).resolve().parents[1]
GOAL_N, GOAL_K = 28672, 8192
COPY_GBPS = 4121.0  # H200 copy bandwidth measured 2026-11-29 (benchmarks/results/quant-nvidia-h200-2026-11-29.md)
LANE_RATE = 132 * 128 * 1.98e9  # H200 thread-instructions per second (SMs x lanes x boost clock)


def estimate(bits_per_weight: float, sass_per_weight: float | None) -> dict:
    """The model's time at the goal shape, M = 1, and how it compares with bf16's bytes floor (None
    without an instruction count: the bytes floor alone would flatter the kernel)."""
    weights = GOAL_N * GOAL_K
    bytes_us = weights * bits_per_weight / 8 / (COPY_GBPS * 1e3)
    bf16_us = weights * 2 / (COPY_GBPS * 1e3)
    if sass_per_weight is None:
        return {"bytes_floor_us": bytes_us, "instruction_us": None, "estimate_us": None, "vs_bf16_floor": None}
    instr_us = weights * sass_per_weight / LANE_RATE * 1e6
    est = max(bytes_us, instr_us)
    return {"bytes_floor_us": bytes_us, "instruction_us": instr_us, "estimate_us": est, "vs_bf16_floor": bf16_us / est}


def triton_rows() -> list[dict]:
    """The fused small-M matmul, every format (bf16 x, double-quantized scales)."""
    from qft.kernels import quant_matmul

    calls: list = []
    record(quant_matmul, calls)
    rows = []
    for fmt in qft.formats.FORMATS:
        qt = qft.quantize(torch.randn(128, 256), fmt, 64, double_quant=True)
        calls.clear()
        quant_matmul.quant_matmul(torch.randn(16, 256, dtype=torch.bfloat16), qt.weight)
        _, fn, args, kwargs = calls[0]
        kwargs = {"num_warps": 4, "num_stages": 3, **kwargs}  # Triton's defaults, as the launcher leaves them
        compiled = compile_launch(fn, args, kwargs)
        (usage,) = res_usage(compiled.asm["cubin"]).values()
        (instructions,) = sass_functions(compiled.asm["cubin"]).values()
        main = max((loop for loop in loops(instructions) if loop["mma"]), key=lambda loop: loop["length"])
        threads = kwargs["num_warps"] * 32
        per_weight = main["length"] * threads / (kwargs["BLOCK_N"] * kwargs["BLOCK_K"])
        for m in (1, 4, 16):  # one 16-row tile serves every M here: the same code
            smem = compiled.metadata.shared
            rows.append(_row("triton quant_matmul", fmt, m, usage, smem, per_weight, main, qt.bits_per_param))
    return rows


def cuda_rows() -> list[dict]:
    """The CUDA chunked decode GEMV (csrc/gemv_core.cuh), compiled with nvcc as setup.py builds it, for bf16
    x: one kernel per bit width x with or without zeros (affine, _icq) x M."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "gemv.cubin"
        source = ROOT / "csrc" / "quant_gemv.cu"
        flags = ["-arch=sm_90", "-cubin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-I{source.parent}"]
        command = ["nvcc", *flags, str(source), "-o", str(cubin)]  # setup.py's flags, one target
        subprocess.run(command, check=True, capture_output=True)
        data = cubin.read_bytes()
    usage, functions = res_usage(data), sass_functions(data)
    rows = []
    for fmt, spec in qft.formats.FORMATS.items():
        bpp = qft.quantize(torch.randn(128, 256), fmt, 64, double_quant=True).bits_per_param
        for m in range(1, GEMV_ROWS + 1):
            name = _chunked_kernel(usage, spec.bits, spec.stores_zeros, m)
            loop = main_gemv_loop(functions[name])
            per_weight = loop["length"] / (GEMV_CHUNK * gemv_rows_per_warp(m))
            smem = 0  # static shared memory only, counted in SHARED
            rows.append(_row("cuda quant_gemv", fmt, m, usage[name], smem, per_weight, loop, bpp))
    return rows


GEMV_ROWS, GEMV_CHUNK = 4, 64  # qft::kMaxGemvRows; gemv::kChunk values per lane and iteration


def gemv_rows_per_warp(m: int) -> int:
    """gemv::rows_per_warp for bf16 x: each lane iteration decodes a chunk of this many weight rows."""
    return 4 if m <= 2 else 2


def _chunked_kernel(usage: dict, bits: int, zeros: bool, m: int) -> str:
    """The mangled name of chunked_kernel<__nv_bfloat16, bits, affine, m>: Itanium mangling spells the
    template arguments as Li<bits>E, Lb<0|1>E, Li<m>E after the bf16 type."""
    key = f"13__nv_bfloat16Li{bits}ELb{int(zeros)}ELi{m}E"
    (name,) = [n for n in usage if "chunked_kernel" in n and key in n]
    return name


def main_gemv_loop(instructions: list) -> dict:
    """The K loop: of the loops with the most FMAs (the compiler may keep two versions of it), the longest."""
    found = loops(instructions)
    most = max(loop["fma"] for loop in found)
    return max((loop for loop in found if loop["fma"] == most), key=lambda loop: loop["length"])


def _row(kernel, fmt, m, usage, dynamic_smem, per_weight, loop, bits_per_param) -> dict:
    return {
        "kernel": kernel,
        "format": fmt,
        "m": m,
        "regs": usage["REG"],
        "spill_bytes": usage["STACK"] + usage["LOCAL"],
        "smem_bytes": usage["SHARED"] + dynamic_smem,
        "sass_per_weight": None if per_weight is None else round(per_weight, 2),
        "main_loop_instructions": None if loop is None else loop["length"],
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in estimate(bits_per_param, per_weight).items()},
    }


def markdown(rows: list[dict], meta: dict) -> str:
    """The table, with the model's caveats."""
    lines = [
        "Static kernel report for sm_90 (no GPU: compiled and disassembled here). A MODEL, not a measurement:",
        f"{meta['note']}",
        "",
        "| kernel | format | M | regs | spill B | smem B | SASS/weight | loop instr | est. us 8192x28672 | vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['format']} | {r['m']} | {r['regs']} | {r['spill_bytes']} | {r['smem_bytes']} | "
            f"{r['sass_per_weight']} | {r['main_loop_instructions']} | {r['estimate_us']} | {r['vs_bf16_floor']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Compile, disassemble, write the report and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    rows = triton_rows() + cuda_rows()
    note = " ".join(__doc__.split("\n\n")[1:4]).replace("\n", " ")
    meta = {"arch": "sm_90", "versions": common.versions(), "note": note}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels-sm90-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

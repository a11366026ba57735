"""Low-bit formats side by side: dequantize to bf16 and the M = 1 forward (decode) for nf4, lloyd3,
int3, lloyd2 and int2 against bf16 cuBLAS, on the 8192x28672 weight (GPU; small shapes on CPU).

    python benchmarks/bench_lowbit.py [--device cpu|cuda] [--quick]

Goals on a GPU at M = 1, 8192x28672: 3-bit >= 3.5x and 2-bit >= 5x faster than bf16 (byte floors
5.1x and 7.5x). The floor column is bytes moved over the measured copy bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch

import qft

FORMATS = ["nf4", "lloyd3", "int3", "lloyd2", "int2"]
GPU_SHAPE, CPU_SHAPE = (28672, 8192), (1024, 1024)  # (out, in)
COLUMNS = ["op", "provider", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "gbps", "pct_of_floor", "vs_bf16"]
CPU_NOTE = "CPU run: small shapes, torch/reference code paths; these are not GPU kernel results."


def _row(op, provider, shape, p, nbytes, rates, device):
    p50, p20, p80 = p
    floor_ms = 1e3 * nbytes / (rates["copy_bandwidth_gbps"] * 1e9)
    return {
        "suite": "lowbit", "op": op, "provider": provider, "shape": shape, "dtype": "bf16",
        "device": common.device_name(device), "p50_ms": p50, "p20_ms": p20, "p80_ms": p80,
        "gbps": nbytes / (p50 * 1e-3) / 1e9, "pct_of_floor": 100 * floor_ms / p50,
    }  # fmt: skip


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, repeats: int = 3):
    """Measure every format; write the result files. Returns (rows, meta, paths)."""
    torch.manual_seed(0)
    rates = rates or common.device_rates(device)
    n, k = GPU_SHAPE if device == "cuda" and not quick else CPU_SHAPE
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    shape = f"1x{n}x{k}"
    rows = [_row("fwd M=1", "bf16 cuBLAS" if device == "cuda" else "bf16 torch", shape,
                 common.time_ms(lambda: torch.nn.functional.linear(x, w), device, repeats), 2 * n * k, rates,
                 device)]  # fmt: skip
    for fmt in FORMATS:
        qt = qft.quantize(w, fmt, 64)
        decode = common.time_ms(qt.dequantize, device, repeats)
        forward = common.time_ms(lambda qt=qt: qft.functional.quant_linear(x, qt), device, repeats)
        rows.append(_row("dequantize", f"qft {fmt}", f"{n}x{k}", decode, qt.nbytes + 2 * n * k, rates, device))
        rows.append(_row("fwd M=1", f"qft {fmt}", shape, forward, qt.nbytes, rates, device))
    bf16 = rows[0]["p50_ms"]
    for row in rows:
        row["vs_bf16"] = bf16 / row["p50_ms"] if row["op"] == "fwd M=1" else None
    meta = {
        "suite": "lowbit", "device": device, "device_name": common.device_name(device),
        "versions": common.versions(), **rates, "note": CPU_NOTE if device == "cpu" else "",
    }  # fmt: skip
    return rows, meta, common.write_results("lowbit", device, rows, meta, out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    return common.suite_main(argv, __doc__, run_suite, COLUMNS, CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

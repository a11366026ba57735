"""Every format side by side: dequantize to bf16, and the small-M forward (M = 1, 4, 16) against bf16
cuBLAS and bitsandbytes' 4-bit path, on the 8192x28672 weight (GPU; small shapes on CPU).

    python benchmarks/bench_lowbit.py [--device cpu|cuda] [--quick] [--formats nf4,int3] [--ms 1]

On a GPU each forward is timed eagerly (``do_bench``, L2 flushed) and replayed as a CUDA graph
(``do_bench_cudagraph``: no Python or launch overhead, which dominates a 30-50 us kernel). Goals at
M = 1 on 8192x28672: 4-bit >= 3x, 3-bit >= 4x, 2-bit >= 6x faster than bf16 (byte floors ~3.9x,
5.1x, 7.5x), and >= 2x bitsandbytes' 4-bit GEMV. The floor column is bytes moved over the measured
copy bandwidth.

Each format is timed three ways: ``qft <fmt>`` as the dispatcher routes it (``qft/ops/thresholds.py``),
``qft <fmt> gemv`` pinned to the CUDA decode GEMV (M <= 4) and ``qft <fmt> fused`` pinned to the fused
Triton kernel (M <= 16), so one run measures every small-M path and the table can be set from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch

import qft
from qft.ops import thresholds

FORMATS = list(qft.formats.FORMATS)  # every format qft declares
GPU_SHAPE, CPU_SHAPE = (28672, 8192), (1024, 1024)  # (out, in)
MS = [1, 4, 16]
COLUMNS = [
    "op",
    "provider",
    "timing",
    "shape",
    "dtype",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "pct_of_floor",
    "vs_bf16",
    "vs_bitsandbytes",
]
CPU_NOTE = "CPU run: small shapes, torch/reference code paths; these are not GPU kernel results."


def _row(op, provider, timing, shape, p, nbytes, rates, device, m=None):
    p50, p20, p80 = p
    floor_ms = 1e3 * nbytes / (rates["copy_bandwidth_gbps"] * 1e9)
    return {
        "suite": "lowbit",
        "op": op,
        "provider": provider,
        "timing": timing,
        "shape": shape,
        "M": m,
        "dtype": "bf16",
        "device": common.device_name(device),
        "p50_ms": p50,
        "p20_ms": p20,
        "p80_ms": p80,
        "gbps": nbytes / (p50 * 1e-3) / 1e9,
        "pct_of_floor": 100 * floor_ms / p50,
    }


def _timings(device: str) -> list[str]:
    return ["eager", "cudagraph"] if device == "cuda" else ["eager"]


def _forward_rows(provider, fn, nbytes, n, k, ms, device, repeats, rates, rec) -> None:
    """One row per M and timing mode for ``fn(x)``; each its own try."""
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        for timing in _timings(device):
            label = {"op": f"fwd M={m}", "provider": provider, "timing": timing, "shape": f"{m}x{n}x{k}", "M": m}
            graph = timing == "cudagraph"
            moved = nbytes + 2 * m * (n + k)

            def measure(x=x, graph=graph, label=label, moved=moved, m=m):
                p = common.time_ms(lambda: fn(x), device, repeats, graph=graph)
                return [_row(label["op"], provider, label["timing"], label["shape"], p, moved, rates, device, m)]

            rec.attempt(label, measure)


# (provider suffix, thresholds.forced limits, largest M the path serves): the dispatcher's own choice,
# then each small-M kernel pinned.
PATHS = [("", None, max(MS)), (" gemv", {"gemv_max_m": 4}, 4), (" fused", {"gemv_max_m": 0, "fused_max_m": 16}, 16)]


def _pinned(limits, qt, x):
    if limits is None:
        return qft.functional.quant_linear(x, qt)
    with thresholds.forced(**limits):
        return qft.functional.quant_linear(x, qt)


def _bnb_forward(w: torch.Tensor):
    """bitsandbytes' nf4 + double-quant forward (its GEMV at M = 1), or None where it is not installed."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None, 0
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nbytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
    return (lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)), nbytes


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, repeats: int = 3):
    """Measure every format, M and timing mode; write the result files. Returns (rows, meta, paths)."""
    torch.manual_seed(0)
    rates = rates or common.device_rates(device)
    n, k = GPU_SHAPE if device == "cuda" and not quick else CPU_SHAPE
    ms = [m for m in (MS[:1] if quick else MS) if common.wanted("ms", m)]
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    rec = common.Recorder("lowbit", device, out)
    if common.wanted("providers", "bf16"):
        bf16 = "bf16 cuBLAS" if device == "cuda" else "bf16 torch"
        _forward_rows(
            bf16, lambda x: torch.nn.functional.linear(x, w), 2 * n * k, n, k, ms, device, repeats, rates, rec
        )
    if common.wanted("providers", "bitsandbytes"):
        try:
            fn, nbytes = _bnb_forward(w)
        except Exception as exc:  # e.g. no bitsandbytes library for this CUDA
            rec.add({"suite": "lowbit", "op": "fwd", "provider": "bitsandbytes nf4", "error": repr(exc)[:300]})
        else:
            if fn is not None:
                _forward_rows("bitsandbytes nf4", fn, nbytes, n, k, ms, device, repeats, rates, rec)
    for fmt in FORMATS:
        if not (common.wanted("formats", fmt) and common.wanted("providers", "qft")):
            continue
        label = {"op": "dequantize", "provider": f"qft {fmt}", "timing": "eager", "shape": f"{n}x{k}"}
        try:
            qt = qft.quantize(w, fmt, 64)
        except Exception as exc:
            rec.add({"suite": "lowbit", **label, "op": "quantize", "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue

        def decode(qt=qt, label=label):
            p = common.time_ms(qt.dequantize, device, repeats)
            return [
                _row("dequantize", label["provider"], "eager", label["shape"], p, qt.nbytes + 2 * n * k, rates, device)
            ]

        rec.attempt(label, decode)
        for path, limits, most in PATHS:
            _forward_rows(
                f"qft {fmt}{path}",
                lambda x, qt=qt, limits=limits: _pinned(limits, qt, x),
                qt.nbytes,
                n,
                k,
                [m for m in ms if m <= most],
                device,
                repeats,
                rates,
                rec,
            )
        del qt
    rows = rec.rows
    for row in rows:
        same = ("op", "timing")
        row["vs_bf16"] = common.ratio(rows, row, "bf16 cuBLAS" if device == "cuda" else "bf16 torch", same)
        row["vs_bitsandbytes"] = common.ratio(rows, row, "bitsandbytes nf4", same)
        if row["op"] == "dequantize":
            row["vs_bf16"] = row["vs_bitsandbytes"] = None
    meta = {
        "suite": "lowbit",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
        **rates,
        "note": CPU_NOTE if device == "cpu" else "",
        "floor": "bytes moved (weight incl. scales + x + y) / measured copy bandwidth",
    }
    return rows, meta, common.write_results("lowbit", device, rows, meta, out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    return common.suite_main(argv, __doc__, run_suite, COLUMNS, CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

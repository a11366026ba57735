"""Quantize / dequantize benchmark: qft against bitsandbytes, side by side in one run.

NF4, block 64, double quantization (the QLoRA setting), bf16 weights. Every provider runs on the
same weight; the dequantize rows also say whether qft decodes bitsandbytes' bytes bit-identically.

    python benchmarks/bench_quant.py                 # 4096x4096 and 8192x28672 on the best device
    python benchmarks/bench_quant.py --quick         # 4096x4096 only
    python benchmarks/bench_quant.py --device cpu --out /tmp/results

On CPU the qft providers are its CPU backend (``qft._cpu``) and the pure-torch reference, and
bitsandbytes runs its CPU backend: those timings compare CPU code paths, not GPU kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import common
import torch

import qft
from qft import ops

SHAPES = [(4096, 4096), (8192, 28672)]
BLOCK = 64
CPU_NOTE = (
    "CPU run: qft's CPU backend and reference path vs bitsandbytes' CPU backend; these are not GPU kernel results."
)


def _bnb():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def providers(device: str) -> list[str]:
    """qft implementations available on ``device`` (plus bitsandbytes when installed)."""
    if device == "cuda":
        names = ["qft-triton"]
        if qft._extension.extension().usable:
            names.insert(0, "qft-cuda")
    else:
        names = ["qft-cpu", "qft-reference"] if qft._extension.cpu_extension().usable else ["qft-reference"]
    return [*names, "bitsandbytes"] if _bnb() is not None else names


def _qft_backend(provider: str) -> str:
    return provider.removeprefix("qft-")


def bench_shape(shape, device: str, repeats: int, copy_gbs: float, rec: common.Recorder) -> None:
    """Rows for quantize and dequantize of one weight shape, every provider, into ``rec``."""
    n = shape[0] * shape[1]
    w = torch.randn(shape, device=device).to(torch.bfloat16)
    bnb = _bnb()
    # Bytes each op must move at least: bf16 weight, nibbles, uint8 absmax (+ fp32 per 256 blocks).
    scale_bytes = n // BLOCK + 4 * (n // BLOCK // 256)
    moved = {"quantize": 2 * n + n // 2 + scale_bytes, "dequantize": n // 2 + scale_bytes + 2 * n}
    bnb_packed = bnb_state = None
    if bnb is not None:
        try:
            bnb_packed, bnb_state = bnb.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
        except Exception as exc:  # e.g. no bitsandbytes library for this CUDA: an error row, qft runs on
            rec.add(
                {
                    "suite": "quant",
                    "op": "quantize nf4+dq",
                    "provider": "bitsandbytes",
                    "shape": f"{shape[0]}x{shape[1]}",
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            bnb = None
    qt = qft.quantize(w, "nf4", BLOCK, double_quant=True)

    for provider in providers(device):
        if not common.wanted("providers", provider) or (provider == "bitsandbytes" and bnb is None):
            continue
        if provider == "bitsandbytes":
            fns = {
                "quantize": lambda: bnb.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True),
                "dequantize": lambda: bnb.dequantize_4bit(bnb_packed, bnb_state),
            }
        else:
            fns = {
                "quantize": lambda: qft.quantize(w, "nf4", BLOCK, double_quant=True),
                "dequantize": lambda: qt.dequantize(torch.bfloat16),
            }
        for op, fn in fns.items():
            label = {"op": f"{op} nf4+dq", "provider": provider, "shape": f"{shape[0]}x{shape[1]}"}
            rec.attempt(
                label,
                lambda op=op, fn=fn, provider=provider, label=label: [
                    _measure(op, fn, provider, label, moved[op], device, repeats, copy_gbs, bnb, bnb_packed, bnb_state)
                ],
            )


def _measure(op, fn, provider, label, nbytes, device, repeats, copy_gbs, bnb, bnb_packed, bnb_state) -> dict:
    with ops.use_backend(_qft_backend(provider)) if provider != "bitsandbytes" else contextlib.nullcontext():
        p50, p20, p80 = common.time_ms(fn, device, repeats)
        matches = None
        if op == "dequantize" and provider != "bitsandbytes" and bnb is not None:
            ours = qft.QuantizedTensor.from_bnb(bnb_packed, bnb_state).dequantize(torch.bfloat16)
            matches = bool(torch.equal(ours, bnb.dequantize_4bit(bnb_packed, bnb_state)))
    gbps = nbytes / (p50 * 1e-3) / 1e9
    return {
        "suite": "quant",
        **label,
        "dtype": "bf16",
        "device": common.device_name(device),
        "p50_ms": p50,
        "p20_ms": p20,
        "p80_ms": p80,
        "bytes": nbytes,
        "gbps": gbps,
        "pct_of_copy_bw": 100 * gbps / copy_gbs,
        "matches_bitsandbytes": matches,
    }


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return rows, cols


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, shapes=None, repeats: int = 3):
    """Measure every shape and provider; write the result files. Returns (rows, meta, paths)."""
    rates = rates or common.device_rates(device)
    copy_gbs = rates["copy_bandwidth_gbps"]
    rec = common.Recorder("quant", device, out)
    for shape in shapes or (SHAPES[:1] if quick else SHAPES):
        if common.wanted("shapes", common.shape_text(shape)):
            bench_shape(shape, device, repeats, copy_gbs, rec)
    rows = rec.rows
    for row in rows:
        row["vs_bitsandbytes"] = common.ratio(rows, row, "bitsandbytes", ("op", "shape"))
    meta = {
        "suite": "quant",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
        **rates,
        "floor": "bytes moved / measured copy bandwidth (read + write)",
        "note": CPU_NOTE if device == "cpu" else f"measured copy bandwidth {copy_gbs:.0f} GB/s",
    }
    return rows, meta, common.write_results("quant", device, rows, meta, out)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="4096x4096 only")
    parser.add_argument("--shape", action="append", type=_shape, help="MxN weight (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU timing repeats (GPU uses do_bench)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="folder for the result files")
    common.add_filter_arguments(parser)
    args = parser.parse_args(argv)
    common.apply_filter_arguments(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cpu":
        print(CPU_NOTE, file=sys.stderr)
    rows, meta, paths = run_suite(args.device, args.quick, args.out, shapes=args.shape, repeats=args.repeats)
    print(common.markdown_table(rows, meta))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())

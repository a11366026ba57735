"""Compile every Triton kernel of qft for a real GPU target on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the CPU tests run kernels) accepts code that the GPU
compiler rejects (module globals, constexpr reassignment, branches whose tiles differ in shape, huge
tensors in untaken branches). This script runs each launcher on CPU tensors with the kernel object
replaced by a recorder, then compiles every recorded launch with ``triton.compile`` for
``GPUTarget("cuda", ARCH, 32)`` (ptxas included). Run without TRITON_INTERPRET; prints one line per
launch and exits 1 if any failed. Used by tests/kernels/test_triton_compile.py and `make compile-check-gpu-triton`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from triton_launches import record, signature

CALLS: list[tuple[str, object, tuple, dict]] = []


# Every module of qft.kernels that holds a kernel (tests/kernels/test_triton_compile.py checks the drive reaches each).
KERNEL_MODULES = (
    "adamw",
    "dequantize",
    "dequantize_codebook4",
    "oft_apply_rotation",
    "oft_build_rotation",
    "quant_matmul",
    "quantize_codebook4",
    "search_scales",
)


def _record_all():
    import importlib

    for name in KERNEL_MODULES:
        record(importlib.import_module(f"qft.kernels.{name}"), CALLS)


def _launch_everything(full: bool):
    """Drive every launcher over the cases the GPU paths use (CPU tensors: nothing runs). The quick
    set covers each kernel and each code path once (bf16 and fp32 alternate); ``full`` crosses all."""
    import qft
    from qft import formats, reference
    from qft.formats import moments8
    from qft.kernels import (
        adamw,
        dequantize,
        dequantize_codebook4,
        oft_apply_rotation,
        oft_build_rotation,
        quant_matmul,
    )
    from qft.kernels import quantize_codebook4 as q4
    from qft.kernels import search_scales as qlow

    bf16, fp32 = torch.bfloat16, torch.float32
    both = (fp32, bf16)
    torch.manual_seed(0)
    for i, fmt in enumerate(("nf4", "fp4")):
        for dtype in both if full else (both[i],):
            q4.quantize_codebook4(torch.randn(96, 128, dtype=dtype), 64, fmt)
    searches = [
        ("int4", "hqq"),
        ("int3", "clip"),
        ("int2", "rtn"),
        ("lloyd3", "hqq"),
        ("lloyd2", "hqq"),
        ("nf3", "hqq"),
    ]
    for i, (fmt, method) in enumerate(searches if full else searches[:2] + searches[3:4]):
        for dtype in both if full else (both[i % 2],):
            qlow.search_scales(torch.randn(96, 128, dtype=dtype), fmt, 64, method)
    weights = [
        (f, dq) for f in ("nf4", "int4", "int3", "int2", "lloyd3", "lloyd2", "nf3", "nf2") for dq in (False, True)
    ]
    if not full:
        weights = [("nf4", True), ("nf4", False), ("int3", True), ("int2", False), ("lloyd2", True), ("int4", False)]
    for i, (fmt, double_quant) in enumerate(weights):
        qt = qft.quantize(torch.randn(96, 128), fmt, 64, double_quant)
        for dtype in both if full else (both[(i + 1) % 2],):
            if formats.is_bnb_codebook(fmt):
                dequantize_codebook4.dequantize_codebook4(qt.weight, dtype)
            else:
                dequantize.dequantize(qt.weight, dtype)
            x = torch.randn(5, 128, dtype=dtype)
            lora = (torch.randn(5, 8), torch.randn(96, 8)) if double_quant else (None, None)
            quant_matmul.quant_matmul(x, qt.weight, torch.randn(96, dtype=dtype), *lora, 0.5)
    for fmt in ("nf4", "int3", "lloyd2"):  # K = 100, blocks crossing rows: the fused matmul's per-value decode
        qt = qft.quantize(torch.randn(96, 100), fmt, 32, True)
        quant_matmul.quant_matmul(torch.randn(5, 100, dtype=bf16), qt.weight)
    for b in (2, 4, 8, 16, 32, 64) if full else (8, 64):  # BOFT groups and ETHER blocks take 2 and 4 too
        params = 0.05 * torch.randn(128 // b, b * (b - 1) // 2)
        for terms in (2, 5) if full else (5,):
            oft_build_rotation.rotation(params, b, terms)
            oft_build_rotation.rotation_grad(params, torch.randn(128 // b, b, b), b, terms)
        rot = reference.oft_rotation(params, b)
        for dtype in both if full else (bf16,):
            x = torch.randn(40, 128, dtype=dtype)
            oft_apply_rotation.rotate(x, rot)
            oft_apply_rotation.rotate_backward(x, torch.randn(40, 128, dtype=dtype), rot)
    maps = moments8.tables("cpu")
    kinds = [(fp32, fp32), (bf16, bf16), (torch.float16, torch.float16), (fp32, bf16)]
    for p_dtype, g_dtype in kinds if full else kinds[:2]:
        entries = []
        for numel, eight in ((5000, True), (300, False)):
            p, g = torch.randn(numel).to(p_dtype), torch.randn(numel).to(g_dtype)
            entry = {"param": p, "grad": g, "scalars": adamw.host_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, False, 1)}
            if eight:
                codes, absmax = moments8.quantize(torch.zeros(numel), True)
                entry.update(
                    exp_avg=codes.clone(),
                    exp_avg_sq=codes.clone(),
                    exp_avg_absmax=absmax.clone(),
                    exp_avg_sq_absmax=absmax.clone(),
                )
            else:
                entry.update(exp_avg=torch.zeros(numel), exp_avg_sq=torch.zeros(numel))
            entries.append(entry)
        adamw.adamw_step(entries, maps)


def _launch_through_dispatcher():
    """Drive the public API the way users reach the kernels (Triton backend forced, every small-M
    path enabled), so the launches recorded are the ones the dispatcher can produce: every format,
    double quantization or not, every float dtype, LoRA and bias or not, M on either side of the fused
    kernel's limit, forward and backward, OFT at every block size the kernels take, the optimizer
    over every parameter / gradient dtype pair. Nothing runs: outputs are empty tensors."""
    import qft
    from qft import formats, ops
    from qft import functional as F
    from qft.ops import thresholds

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    torch.manual_seed(0)
    with ops.use_backend("triton"), thresholds.forced(fused_max_m=16, gemv_max_m=0):
        for fmt in sorted(formats.FORMATS):
            for double_quant in (False, True):
                for dtype in dtypes:
                    qt = qft.quantize(torch.randn(96, 128, dtype=dtype), fmt, 64, double_quant)
                    qt.dequantize(dtype)
                    for m in (5, 40):
                        x = torch.randn(m, 128, dtype=dtype, requires_grad=True)
                        F.quant_linear(x, qt, torch.randn(96, dtype=dtype))
                        a = torch.randn(8, 128, requires_grad=True)
                        b = torch.randn(96, 8, requires_grad=True)
                        F.lora_linear(x, qt, a, b, 0.5).sum().backward()
        for fmt in sorted(formats.FORMATS):  # K = 100, blocks crossing rows: the per-value decode
            for dtype in dtypes:
                F.quant_linear(torch.randn(5, 100, dtype=dtype), qft.quantize(torch.randn(96, 100), fmt, 32, True))
        qt = qft.quantize(torch.randn(96, 128), "nf4", 64, True)
        for block in (2, 4, 8, 16, 32, 64):  # 2 and 4: BOFT's smallest groups, ETHER's smallest blocks
            for dtype in dtypes:
                for m in (5, 40):
                    x = torch.randn(m, 128, dtype=dtype, requires_grad=True)
                    w = (0.05 * torch.randn(128 // block, block * (block - 1) // 2)).requires_grad_()
                    F.oft_linear(x, qt, w, block).float().sum().backward()
        for p_dtype, g_dtype in [(d, d) for d in dtypes] + [(torch.float32, torch.bfloat16)]:
            for optimizer in (qft.optim.PagedAdamW, qft.optim.PagedAdamW8bit):
                params = [torch.randn(5000).to(p_dtype).requires_grad_(), torch.randn(300).to(p_dtype).requires_grad_()]
                for p in params:
                    if g_dtype != p_dtype and hasattr(p, "grad_dtype"):
                        p.grad_dtype = None  # torch >= 2.10 checks gradient dtypes unless told not to
                    p.grad = torch.randn(p.shape).to(g_dtype)
                optimizer(params, min_8bit_size=4096).step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="sm version to compile for")
    parser.add_argument("--full", action="store_true", help="every dtype x format x option (slow)")
    parser.add_argument("--dispatch", action="store_true", help="the launches the dispatcher can produce")
    parser.add_argument("--list", action="store_true", help="print the distinct launches, compile nothing")
    parser.add_argument("--shard", default="0/1", help="k/n: compile every n-th distinct launch from k")
    args = parser.parse_args()
    k, n = (int(v) for v in args.shard.split("/"))
    target = GPUTarget("cuda", args.arch, 32)
    _record_all()
    if args.dispatch:
        _launch_through_dispatcher()
    else:
        _launch_everything(args.full)
    launches = {}
    for name, fn, call_args, kwargs in CALLS:
        types, constexprs = signature(fn, call_args, kwargs)
        key = (name, tuple(sorted(types.items())), tuple(sorted((c, repr(v)) for c, v in constexprs.items())))
        launches.setdefault(key, (name, fn, types, constexprs))
    if args.list:
        for name, _, _, constexprs in launches.values():
            print(f"{name} {', '.join(f'{c}={v}' for c, v in constexprs.items() if v is not None)}")
        print(f"{len(launches)} distinct launches")
        return 0
    seen, failures = list(launches.values())[k::n], 0
    for name, fn, types, constexprs in seen:
        label = f"{name} {', '.join(f'{k}={v}' for k, v in constexprs.items() if v is not None)}"
        try:
            triton.compile(ASTSource(fn=fn, signature=types, constexprs=constexprs), target=target)
            print(f"ok   {label}")
        except Exception as exc:  # report every failure, not only the first
            cause = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            print(f"FAIL {label}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}")
            failures += 1
    print(f"{len(seen)} launches compiled for sm_{args.arch}, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

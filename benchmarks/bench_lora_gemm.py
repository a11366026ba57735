"""The large-M LoRA arrangement, fused (one GEMM over K + r each way, ``qft.ops.gemm.lora_forward`` /
``lora_backward``) against the one before it (base GEMM with an M x N LoRA epilogue; backward with the
LoRA grads from an fp32 copy of g), forward + backward of one bf16 layer.

Both arrangements decode W the same way (torch's reference decode into the scratch rows, whose own
fp32 work counts in both), so the rows compare only what the arrangement adds: time, and the bytes of
the tensors it creates (counted with a ``TorchDispatchMode``), of which those of size M x N besides y
and in fp32 beyond M x r.

    python benchmarks/bench_lora_gemm.py [--device cpu|cuda] [--out DIR] [--quick] [--repeats N]

On CPU these are torch's CPU GEMMs, not GPU kernels: the byte counts carry over, the times do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qft
from qft import formats, reference
from qft.ops import gemm

SHAPES = {"cpu": [(1024, 1024, 2048, 16)], "cuda": [(8192, 4096, 14336, 16), (8192, 4096, 4096, 16)]}  # M, K, N, r
COLUMNS = ["op", "provider", "shape", "dtype", "p50_ms", "created_mb", "m_by_n_extra", "fp32_over_mr_mb", "vs_before"]


def _decode(weight, dtype, out):
    out.copy_(formats.dequantize(weight, dtype).view(out.shape))
    return out


def fused(x, weight, a, b, grad, scaling=2.0):
    """Forward and backward through the K + r GEMMs."""
    xa = (x @ a.t().to(x.dtype)).float()
    gemm.lora_forward(x, weight, None, xa, b, scaling, _decode)
    return gemm.lora_backward(grad, weight, x, xa, a, b, scaling, None, 1.0, True, _decode)


def before(x, weight, a, b, grad, scaling=2.0):
    """The arrangement the K + r GEMMs replace: the LoRA term as an M x N epilogue of the base GEMM,
    the backward's LoRA grads from an fp32 copy of g."""
    n = weight.numel // x.shape[1]
    xa = x.float() @ a.t()
    gemm.linear(x, gemm.decoded(weight, n, x.dtype, _decode), None, xa, b, scaling)

    def grad_input(grad_xa):
        w = gemm.decoded(weight, n, grad.dtype, _decode)
        return gemm.linear_grad_input(grad, w, grad_xa, a, None, 1.0)

    return reference.lora_backward(grad, x, xa, a, b, scaling, True, grad_input)


class _Created(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.append(t)
        return out


def run(device: str, out, quick: bool = False, repeats: int = 3) -> list[dict]:
    """Time and count both arrangements at each shape (``quick``: the CPU shape); write the result files."""
    rows = []
    for m, k, n, r in SHAPES["cpu" if quick else device]:
        torch.manual_seed(0)
        weight = qft.quantize(torch.randn(n, k, device=device), "nf4", 64).weight
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        grad = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        a, b = 0.1 * torch.randn(r, k, device=device), 0.1 * torch.randn(n, r, device=device)
        timed = {}
        for name, fn in (("before (M x N epilogue)", before), ("fused (K + r GEMMs)", fused)):
            fn(x, weight, a, b, grad)  # warm: scratch buffers
            with _Created() as record:
                fn(x, weight, a, b, grad)
            made = record.made
            args = (x, weight, a, b, grad)
            p50, _, _ = common.time_ms(lambda fn=fn, args=args: fn(*args), device, repeats)
            timed[name] = p50
            rows.append(
                {
                    "op": "lora fwd+bwd",
                    "provider": name,
                    "shape": f"{m}x{k}x{n} r{r}",
                    "dtype": "bf16",
                    "p50_ms": round(p50, 3),
                    "created_mb": round(sum(t.nbytes for t in made) / 2**20, 2),
                    "m_by_n_extra": sum(1 for t in made if set(t.shape) == {m, n}) - 1,  # y is one
                    "fp32_over_mr_mb": round(
                        sum(t.nbytes for t in made if t.dtype == torch.float32 and t.numel() > m * r) / 2**20, 2
                    ),
                }
            )
        for row in rows[-2:]:
            row["vs_before"] = round(timed["before (M x N epilogue)"] / row["p50_ms"], 3)
    meta = {
        "suite": "lora_gemm",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
    }
    meta["note"] = __doc__.split("\n\n")[1].replace("\n", " ")
    for path in common.write_results("lora_gemm", device, rows, meta, out, COLUMNS):
        print(f"wrote {path}")
    lines = "".join(json.dumps(row) + "\n" for row in rows)  # as common.Recorder keeps rows
    (out / f"{common.result_stem('lora_gemm', device)}.jsonl").write_text(lines)
    print(common.markdown_table(rows, meta, COLUMNS))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=common.RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="the small CPU shape on any device")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.device, Path(args.out), args.quick, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Host time of qft's fused AdamW ``step()`` with the kernel launch stubbed out: the Python work the
GPU step costs before anything reaches the device (tables, step counts, scalars, copies).

    python benchmarks/optim_host.py [--label TEXT] [--layers 32] [--out benchmarks/results]

The parameter set is the LoRA set of bench_optim (A and B of r = 16 on every linear of a
Llama-3-8B-shaped model: 448 tensors at 32 layers). Runs on CPU with the Triton backend forced
(``TRITON_INTERPRET=1``) and ``_adamw_multi_kernel`` replaced by a no-op, so only the host side is
timed. Rows are appended to ``optim-host-<cpu>-<date>.jsonl`` under a label (e.g. the commit), so
before/after figures sit side by side in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import common
import torch
from bench_optim import lora_shapes

import qft
from qft import ops


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_step_ms(cls, layers: int, repeats: int) -> float:
    """Median host milliseconds of one ``step()`` (after the state exists) with the launch stubbed."""
    import qft.kernels.adamw as kernel_module

    params = [torch.zeros(shape).requires_grad_() for shape in lora_shapes(layers)]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = cls(params, lr=1e-4)
    saved = kernel_module._adamw_multi_kernel
    kernel_module._adamw_multi_kernel = _NoLaunch()
    try:
        with ops.use_backend("triton"):
            opt.step()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                opt.step()
                samples.append((time.perf_counter() - start) * 1e3)
    finally:
        kernel_module._adamw_multi_kernel = saved
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    """Measure both optimizers, append labelled rows, rewrite the markdown table of every label."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", help="what code was measured (default: the git commit)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    label = (
        args.label
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / common.result_stem("optim-host", "cpu")
    jsonl = stem.with_suffix(".jsonl")
    tensors = len(lora_shapes(args.layers))
    with jsonl.open("a") as f:
        for cls in (qft.optim.PagedAdamW, qft.optim.PagedAdamW8bit):
            ms = host_step_ms(cls, args.layers, args.repeats)
            row = {
                "suite": "optim-host",
                "op": "step, kernel stubbed",
                "provider": f"qft {cls.__name__}",
                "code": label,
                "tensors": tensors,
                "host_ms": ms,
                "device": common.device_name("cpu"),
                "versions": ", ".join(f"{k} {v}" for k, v in common.versions().items()),
            }
            f.write(json.dumps(row) + "\n")
            print(f"{row['provider']}: {ms:.2f} ms host per step ({tensors} tensors, {label})")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    lines = [
        "Host time of one fused AdamW step() with the kernel launch stubbed (CPU, Triton backend forced).",
        "",
        "| code | provider | tensors | host_ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['code']} | {r['provider']} | {r['tensors']} | {r['host_ms']:.2f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

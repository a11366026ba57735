"""Optimizer step benchmark: qft PagedAdamW (32-bit) and PagedAdamW8bit against torch AdamW and
bitsandbytes PagedAdamW / PagedAdamW8bit, on a LoRA-sized set and on one large tensor.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--quick]

The LoRA-sized set is the A/B matrices of r = 16 adapters on every linear of a Llama-3-8B-shaped
model (32 layers x 7 linears x 2 = 448 tensors, ~42M parameters); on CPU (and with --quick) a
1/16 slice of it. On a GPU the rows also report the state's bytes and how much GPU memory
page_out() returns (``torch.cuda.mem_get_info`` before and after), and each step's speed relative to
torch AdamW(fused) and to bitsandbytes' PagedAdamW8bit; "qft AdamW8bit" (not paged) is the baseline
of the paged step's overhead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch

import qft

LINEARS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
COLUMNS = [
    *common.TIMING_COLUMNS,
    "params_m",
    "state_mb",
    "page_out_freed_mb",
    "vs_torch",
    "vs_bnb_paged8",
]
CPU_NOTE = "CPU run: a slice of the LoRA set; these are not GPU kernel results."


def lora_shapes(layers: int) -> list[tuple[int, int]]:
    """A [16, in] and B [out, 16] for every linear of ``layers`` decoder layers."""
    return [s for _ in range(layers) for out, inp in LINEARS for s in ((16, inp), (out, 16))]


def providers() -> dict[str, object]:
    """Optimizer constructors by name (bitsandbytes' where installed)."""
    out = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=ps[0].is_cuda or None),
        "qft PagedAdamW": lambda ps: qft.optim.PagedAdamW(ps, lr=1e-4),
        "qft PagedAdamW8bit": lambda ps: qft.optim.PagedAdamW8bit(ps, lr=1e-4),
        "qft AdamW8bit": lambda ps: qft.optim.AdamW8bit(ps, lr=1e-4),
    }
    try:
        import bitsandbytes as bnb
    except ImportError:
        return out
    out["bnb PagedAdamW"] = lambda ps: bnb.optim.PagedAdamW(ps, lr=1e-4)
    out["bnb PagedAdamW8bit"] = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4)
    return out


def _state_mb(opt) -> float:
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _page_out_freed_mb(opt) -> float | None:
    """GPU memory that page_out() gives back, from the driver's free-memory count."""
    if not hasattr(opt, "page_out"):
        return None
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    opt.page_out()
    torch.cuda.synchronize()
    freed = (torch.cuda.mem_get_info()[0] - free_before) / 2**20
    opt.page_in()
    torch.cuda.synchronize()
    return freed


def _measure(make, name, label, params, device, repeats) -> dict:
    ps = [p.clone().requires_grad_() for p in params]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make(ps)
    opt.step()  # create the state
    p50, p20, p80 = common.time_ms(opt.step, device, repeats)
    freed = _page_out_freed_mb(opt) if device == "cuda" and name.startswith("qft Paged") else None
    return {
        "suite": "optim",
        **label,
        "dtype": "fp32",
        "device": common.device_name(device),
        "p50_ms": p50,
        "p20_ms": p20,
        "p80_ms": p80,
        "params_m": sum(p.numel() for p in ps) / 1e6,
        "state_mb": _state_mb(opt),
        "page_out_freed_mb": freed,
    }


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, repeats: int = 3):
    """Time one step per optimizer and parameter set; write the files. Returns (rows, meta, paths)."""
    rates = rates or common.device_rates(device)
    small = device == "cpu" or quick
    sets = {"LoRA set": lora_shapes(2 if small else 32), "one tensor": [(1024, 1024) if small else (14336, 4096)]}
    rec = common.Recorder("optim", device, out)
    for set_name, shapes in sets.items():
        params = [torch.randn(s, device=device) * 0.02 for s in shapes]
        for name, make in providers().items():
            if common.wanted("providers", name):
                label = {"op": f"step ({set_name})", "provider": name, "shape": f"{len(shapes)} tensors"}
                rec.attempt(
                    label,
                    lambda make=make, name=name, label=label, params=params: [
                        _measure(make, name, label, params, device, repeats)
                    ],
                )
    rows = rec.rows
    for row in rows:
        row["vs_torch"] = common.ratio(rows, row, "torch AdamW")
        row["vs_bnb_paged8"] = common.ratio(rows, row, "bnb PagedAdamW8bit")
    meta = {
        "suite": "optim",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
        **rates,
        "note": CPU_NOTE if small else "",
    }
    return rows, meta, common.write_results("optim", device, rows, meta, out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    return common.suite_main(argv, __doc__, run_suite, COLUMNS, CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

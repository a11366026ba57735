"""Quantized linear + LoRA benchmark: qft against PEFT over bf16 nn.Linear and over bitsandbytes
Linear4bit, side by side in one run; forward and forward+backward, time and peak memory.

    python benchmarks/bench_linear.py            # GPU: Llama-3-8B-like shapes, M = 1..8192, r = 16
    python benchmarks/bench_linear.py --device cpu --quick

Providers: qft (QuantLinear + LoRALinear, nf4 + double quant), peft-bf16 (nn.Linear + PEFT LoRA),
peft-bnb (bitsandbytes Linear4bit nf4 + double quant + PEFT LoRA), and OFT with b = 32: qft-oft
(QuantLinear + OFTLinear) and peft-oft-bnb (Linear4bit + PEFT OFT). On CPU the shapes are small and
timings compare CPU code paths, not GPU kernels; peak memory is measured on GPU only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch
from torch import nn

import qft

GPU_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in), Llama-3-8B
GPU_MS = [1, 16, 64, 512, 4096, 8192]
DECODE_SHAPE, DECODE_MS = (28672, 8192), [1, 4, 16]  # the GEMV goal: forward only
CPU_SHAPES, CPU_MS = [(512, 512), (1024, 256)], [1, 16, 128]
CPU_EXTRA_CASES = [((1024, 4096), 512)]  # (out, in), M: one projection-sized layer at a training M
RANK = 16
OFT_BLOCK = 32
COLUMNS = [
    *common.TIMING_COLUMNS,
    "tflops",
    "pct_of_floor",
    "peak_mem_mb",
    "vs_peft_bf16",
    "vs_peft_bnb",
    "vs_peft_oft_bnb",
]
CPU_NOTE = "CPU run: small shapes, CPU code paths of every provider; these are not GPU kernel results."


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _bnb_layer(dense: nn.Linear, device: str) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        compute_dtype=dense.weight.dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    layer.load_state_dict({k: v.float().cpu() for k, v in dense.state_dict().items()})
    return layer.to(device)


def build(provider: str, dense: nn.Linear, device: str) -> nn.Module:
    """One linear layer with its adapter: LoRA r = 16 (B nonzero so the adapter path is real work) or
    OFT b = 32 (``*-oft`` providers)."""
    from peft import LoraConfig, get_peft_model
    from peft import OFTConfig as PeftOFTConfig

    if provider in ("qft", "qft-oft"):
        model = _Holder(qft.nn.QuantLinear.from_linear(dense))
        config = (
            qft.OFTConfig(block_size=OFT_BLOCK, target_modules=("proj",))
            if provider == "qft-oft"
            else qft.LoRAConfig(r=RANK, alpha=2 * RANK, target_modules=("proj",))
        )
        qft.add_adapters(model, config)
    elif provider == "peft-oft-bnb":
        config = PeftOFTConfig(r=0, oft_block_size=OFT_BLOCK, target_modules=["proj"])
        model = get_peft_model(_Holder(_bnb_layer(dense, device)), config)
    else:
        if provider == "peft-bf16":
            layer = nn.Linear(dense.in_features, dense.out_features, dtype=dense.weight.dtype, device=device)
            layer.load_state_dict(dense.state_dict())
        else:
            layer = _bnb_layer(dense, device)
        model = get_peft_model(_Holder(layer), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name or "oft_R" in name:
            nn.init.normal_(p, std=0.01)
    return model


def providers() -> list[str]:
    """The LoRA providers, then OFT: qft's and PEFT's over bitsandbytes when both are installed."""
    names = common.peer_providers()
    return [*names, "qft-oft", "peft-oft-bnb"] if "peft-bnb" in names else [*names, "qft-oft"]


def _peak_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _step_fns(provider, dense, x, grad, device, rec, label) -> dict | None:
    """``{op: (fn, flops)}`` of one provider's layer (forward without grad, forward + backward), or None
    when it does not build (an error row is recorded)."""
    model = rec.build(label, lambda: build(provider, dense, device))
    if model is None:
        return None
    xg = x.clone().requires_grad_()
    m, k = x.shape
    n = dense.out_features

    def forward():
        with torch.no_grad():
            return model(x)

    def train_step():
        model(xg).backward(grad)
        xg.grad = None
        for p in model.parameters():
            p.grad = None

    return {"fwd": (forward, 2 * m * n * k), "fwd+bwd": (train_step, 4 * m * n * k)}


def _row(op, provider, timing, fn_flops, x, n, k, device, rates) -> dict:
    """One result row from ``timing`` (p50, p20, p80 ms, or the exception that provider raised)."""
    if isinstance(timing, Exception):
        raise timing
    fn, flops = fn_flops
    m = x.shape[0]
    p50, p20, p80 = timing
    return {
        "suite": "linear",
        "op": op,
        "provider": provider,
        "shape": f"{m}x{n}x{k}",
        "M": m,
        "N": n,
        "K": k,
        "r": RANK,
        "dtype": str(x.dtype).removeprefix("torch."),
        "device": common.device_name(device),
        "p50_ms": p50,
        "p20_ms": p20,
        "p80_ms": p80,
        "tflops": flops / (p50 * 1e-3) / 1e12,
        # floor: the larger of the GEMM flops at the measured matmul rate and the bytes of a
        # 4-bit weight + x + y at the measured copy bandwidth
        "pct_of_floor": 100 * _floor_ms(op, m, n, k, x.element_size(), rates) / p50,
        "peak_mem_mb": _peak_mb(fn, device),
    }


def _floor_ms(op: str, m: int, n: int, k: int, elem: int, rates: dict) -> float:
    passes = 1 if op == "fwd" else 2  # forward; forward + grad_x
    flops = passes * 2 * m * n * k
    nbytes = passes * (n * k * 4.127 / 8 + (m * k + m * n) * elem)
    compute = flops / (rates["matmul_tflops"] * 1e12)
    memory = nbytes / (rates["copy_bandwidth_gbps"] * 1e9)
    return 1e3 * max(compute, memory)


def bench_case(shape, m: int, device: str, dtype, repeats: int, ops_wanted, rates, rec: common.Recorder) -> None:
    """Rows for one (out, in) shape and M, every provider (each its own try), into ``rec``."""
    n, k = shape
    dense = nn.Linear(k, n, dtype=dtype, device=device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    grad = torch.randn(m, n, dtype=dtype, device=device)
    labels, steps = {}, {}
    for provider in providers():
        if common.wanted("providers", provider):
            labels[provider] = {"provider": provider, "shape": f"{m}x{n}x{k}", "M": m, "N": n, "K": k}
            fns = _step_fns(provider, dense, x, grad, device, rec, labels[provider])
            if fns is None:
                continue
            steps[provider] = fns
            if device == "cuda":  # one model on the GPU at a time; do_bench needs no turns
                _record(steps, labels, ops_wanted, x, n, k, device, repeats, rates, rec)
                steps.clear()
                torch.cuda.empty_cache()
    _record(steps, labels, ops_wanted, x, n, k, device, repeats, rates, rec)


def _record(steps: dict, labels: dict, ops_wanted, x, n, k, device, repeats, rates, rec) -> None:
    """Rows of every op of the providers in ``steps``, timed side by side (common.time_side_by_side)."""
    for op in ops_wanted if steps else ():
        timings = common.time_side_by_side({p: fns[op][0] for p, fns in steps.items()}, device, repeats)
        for provider, fns in steps.items():
            args = (op, provider, timings[provider], fns[op], x, n, k, device, rates)
            rec.attempt({**labels[provider], "op": op}, lambda args=args: [_row(*args)])


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, repeats: int = 3):
    """Measure every case and provider; write the result files. Returns (rows, meta, paths)."""
    torch.manual_seed(0)
    rates = rates or common.device_rates(device)
    if device == "cuda":
        shapes, ms = GPU_SHAPES, GPU_MS
        cases = [(s, m, ("fwd", "fwd+bwd")) for s in shapes for m in ms]
        cases += [(DECODE_SHAPE, m, ("fwd",)) for m in DECODE_MS]
    else:
        shapes, ms = CPU_SHAPES, CPU_MS
        cases = [(s, m, ("fwd", "fwd+bwd")) for s in shapes for m in ms]
        cases += [(shape, m, ("fwd", "fwd+bwd")) for shape, m in CPU_EXTRA_CASES]
    if quick:
        cases = [c for c in cases if c[0] == shapes[0] and c[1] in (ms[0], ms[-1])]
    cases = [c for c in cases if common.wanted("shapes", common.shape_text(c[0])) and common.wanted("ms", c[1])]
    rec = common.Recorder("linear", device, out)
    for shape, m, wanted in cases:
        bench_case(shape, m, device, torch.bfloat16, repeats, wanted, rates, rec)
    rows = rec.rows
    for row in rows:
        for peer in ("peft-bf16", "peft-bnb", "peft-oft-bnb"):
            row[f"vs_{peer.replace('-', '_')}"] = common.ratio(rows, row, peer, ("op", "shape"))
    meta = {
        "suite": "linear",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
        "rank": RANK,
        **rates,
        "note": CPU_NOTE if device == "cpu" else "",
    }
    return rows, meta, common.write_results("linear", device, rows, meta, out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    return common.suite_main(argv, __doc__, run_suite, COLUMNS, CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

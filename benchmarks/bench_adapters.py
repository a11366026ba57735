"""Every adapter family over one quantized linear layer, forward+backward, against qft's QLoRA and
against PEFT's BOFT (over bitsandbytes Linear4bit) and HRA, side by side in one run.

    python benchmarks/bench_adapters.py            # GPU: Llama-3-8B shapes at M = 8192, bf16
    python benchmarks/bench_adapters.py --device cpu --quick

The goals (issue 18): each qft family within 1.15x of qft's LoRA (``vs_qft_lora`` <= 1.15) and
>= 3x faster than PEFT's BOFT / HRA over bitsandbytes (``peft_over_qft`` >= 3). PEFT builds BOFT's
block diagonal with a CUDA extension it compiles at run time; without it (on CPU, or where the build
fails) it silently trains one butterfly factor, which ``peft_factors`` records. PEFT's HRA multiplies
the base layer's ``weight`` itself (W H, then F.linear), so over Linear4bit's packed bytes it fails;
its peer row is PEFT's HRA over a bf16 nn.Linear holding the same weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch
from bench_linear import _bnb_layer, _Holder, _peak_mb
from torch import nn

import qft

GPU_SHAPES, GPU_MS = [(4096, 4096), (14336, 4096), (4096, 14336)], [8192]  # (out, in)
CPU_SHAPES, CPU_MS = [(512, 512)], [128, 512]
BOFT = {"boft_block_size": 8, "boft_n_butterfly_factor": 2}
QFT_CONFIGS = {  # each family at the settings this bench times
    "qft-lora": lambda: qft.LoRAConfig(r=16, alpha=32, target_modules=("proj",)),
    "qft-oft": lambda: qft.OFTConfig(block_size=32, target_modules=("proj",)),
    "qft-boft": lambda: qft.BOFTConfig(**BOFT, target_modules=("proj",)),
    "qft-diablo": lambda: qft.DiaBloConfig(blocks=64, target_modules=("proj",)),
    "qft-ether": lambda: qft.ETHERConfig(blocks=32, plus=True, output_side=True, target_modules=("proj",)),
    "qft-hra": lambda: qft.HRAConfig(r=8, target_modules=("proj",)),
}
PEFT_PEERS = {"peft-boft-bnb": "qft-boft", "peft-hra-bf16": "qft-hra"}
COLUMNS = [*common.TIMING_COLUMNS, "trainable", "peak_mem_mb", "vs_qft_lora", "peft_over_qft", "peft_factors"]
CPU_NOTE = "CPU run: small shapes, CPU code paths of every provider; these are not GPU kernel results."


def build(provider: str, dense: nn.Linear, device: str) -> nn.Module:
    """One layer with its adapter, moved off the identity (random trainable values) so the adapter's
    work is real."""
    if provider in QFT_CONFIGS:
        model = _Holder(qft.nn.QuantLinear.from_linear(dense))
        qft.add_adapters(model, QFT_CONFIGS[provider]())
    else:
        from peft import BOFTConfig, HRAConfig, get_peft_model

        if provider == "peft-boft-bnb":
            model = get_peft_model(_Holder(_bnb_layer(dense, device)), BOFTConfig(**BOFT, target_modules=["proj"]))
        else:
            layer = nn.Linear(dense.in_features, dense.out_features, dtype=dense.weight.dtype, device=device)
            layer.load_state_dict(dense.state_dict())
            model = get_peft_model(_Holder(layer), HRAConfig(r=8, target_modules=["proj"]))
    model = model.to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model


def _peft_factors(model) -> int | None:
    layer = getattr(getattr(model, "base_model", None), "model", None)
    r = getattr(getattr(layer, "proj", None), "boft_R", None)
    return None if r is None else r["default"].shape[0]


def bench_case(shape, m: int, device: str, repeats: int, rec: common.Recorder) -> None:
    """fwd+bwd rows for one (out, in) shape and M, every provider (each its own try)."""
    n, k = shape
    dense = nn.Linear(k, n, dtype=torch.bfloat16, device=device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device, requires_grad=True)
    grad = torch.randn(m, n, dtype=torch.bfloat16, device=device)
    for provider in [*QFT_CONFIGS, *PEFT_PEERS]:
        if not common.wanted("providers", provider):
            continue
        label = {"provider": provider, "shape": f"{m}x{n}x{k}", "M": m, "N": n, "K": k}
        model = rec.build(label, lambda provider=provider: build(provider, dense, device))
        if model is None:
            continue

        def step(model=model):
            model(x).backward(grad)
            x.grad = None
            for p in model.parameters():
                p.grad = None

        def measure(label=label, step=step, model=model):
            p50, p20, p80 = common.time_ms(step, device, repeats)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return [
                {
                    "suite": "adapters",
                    "op": "fwd+bwd",
                    **label,
                    "dtype": "bfloat16",
                    "device": common.device_name(device),
                    "p50_ms": p50,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "trainable": trainable,
                    "peak_mem_mb": _peak_mb(step, device),
                    "peft_factors": _peft_factors(model),
                }
            ]

        rec.attempt({**label, "op": "fwd+bwd"}, measure)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, repeats: int = 3):
    """Measure every case and provider; write the result files. Returns (rows, meta, paths)."""
    torch.manual_seed(0)
    shapes, ms = (GPU_SHAPES, GPU_MS) if device == "cuda" else (CPU_SHAPES, CPU_MS)
    if quick:
        shapes, ms = shapes[:1], ms[:1]
    rec = common.Recorder("adapters", device, out)
    for shape in shapes:
        for m in ms:
            if common.wanted("shapes", common.shape_text(shape)) and common.wanted("ms", m):
                bench_case(shape, m, device, repeats, rec)
    rows = rec.rows
    for row in rows:
        lora = common.ratio(rows, row, "qft-lora", ("op", "shape"))
        row["vs_qft_lora"] = None if lora is None else 1 / lora  # this family's time over QLoRA's
        if row["provider"] in PEFT_PEERS.values():
            peer = next(p for p, ours in PEFT_PEERS.items() if ours == row["provider"])
            row["peft_over_qft"] = common.ratio(rows, row, peer, ("op", "shape"))
    meta = {
        "suite": "adapters",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
        **(rates or common.device_rates(device)),
        "boft": BOFT,
        "note": CPU_NOTE if device == "cpu" else "",
    }
    return rows, meta, common.write_results("adapters", device, rows, meta, out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    return common.suite_main(argv, __doc__, run_suite, COLUMNS, CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

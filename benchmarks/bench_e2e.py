"""End-to-end training step: a full Llama-3-8B-shaped model, qft vs PEFT over bitsandbytes vs PEFT over bf16.

All 32 decoder layers built from a transformers ``LlamaConfig`` directly on the GPU in bf16 (random
weights, no CPU copy), every decoder linear quantized on the device to nf4 + double quant (the LM
head stays bf16, as transformers' bitsandbytes loader leaves it), LoRA r = 16 on all of them,
sequence 2048, gradient checkpointing on. The parts no stack here owns (RMSNorm, RoPE, SwiGLU and the
128k-vocabulary loss) come from Liger kernels, applied to every model alike, so the loss never holds
full-vocabulary logits (the fused linear cross entropy); the meta records whether Liger was there.
``qft-fused`` is qft with ``qft.nn.fuse_projections`` (q/k/v and gate/up sharing one decode + GEMM),
kept opt-in until this measures it. Reports one training step's tokens/s and peak memory. On CPU a
tiny config runs as a smoke test only (no Liger there: its kernels are Triton's, for the GPU), with
checkpointing off and on.

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import common
import torch
from torch import nn

import qft

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_CONFIG = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
CPU_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
COLUMNS = [
    *common.TIMING_COLUMNS,
    "tokens_per_s",
    "peak_mem_mb",
    "vs_peft_bf16",
    "vs_peft_bnb",
]
CPU_NOTE = "CPU run: a tiny config as a smoke test; not GPU kernel results and not the Llama-3-8B model."


def build(provider: str, dense_state: dict, config, device: str, dtype) -> nn.Module:
    """The slice for one provider, from the same dense weights."""
    model = _empty_model(config, device, dtype)
    model.load_state_dict(dense_state)
    if provider in ("qft", "qft-fused"):
        qft.quantize_(model, filter_fn=lambda module, name: name != "lm_head")
        qft.add_adapters(model, qft.LoRAConfig(r=16, alpha=32, target_modules=TARGETS))
        if provider == "qft-fused":  # q/k/v and gate/up as one decode + GEMM each (opt-in)
            qft.nn.fuse_projections(model)
        return model
    from peft import LoraConfig, get_peft_model

    if provider == "peft-bnb":
        import bitsandbytes as bnb

        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    module.in_features,
                    module.out_features,
                    bias=False,  # Llama's linears have none
                    compute_dtype=dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                    device="meta",
                )
                # quantized where the weight already is (Params4bit quantizes on .to() of a GPU)
                weight = bnb.nn.Params4bit(
                    module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                layer.weight = weight.to(device)
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, layer)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS)))


def _empty_model(config, device: str, dtype):
    """The Llama model built directly on ``device`` in ``dtype`` (no fp32 copy on the host first)."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def apply_shared_kernels(model, device: str) -> str:
    """Liger's RMSNorm, RoPE, SwiGLU and fused linear cross entropy on ``model`` (GPU only); returns
    what was applied, for the meta."""
    if device != "cuda":
        return "none (CPU)"
    try:
        import liger_kernel
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        return "none (liger-kernel not installed: the loss materializes full-vocabulary logits)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply_liger_kernel_to_llama(model=base)
    return f"liger-kernel {getattr(liger_kernel, '__version__', '?')}: rms_norm, rope, swiglu, fused linear CE"


def _step_fn(model, ids, checkpointing: bool):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def _measure(model, ids, checkpointing: bool, label: dict, device: str, repeats: int) -> dict:
    fn = _step_fn(model, ids, checkpointing)
    timing = common.time_ms(fn, device, repeats)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    return _row(label, timing, ids.shape[1], device, peak)


def _row(label: dict, timing, seq: int, device: str, peak: float | None = None) -> dict:
    """One result row from ``timing`` (p50, p20, p80 ms, or the exception the step raised)."""
    if isinstance(timing, Exception):
        raise timing
    p50, p20, p80 = timing
    return {
        "suite": "e2e",
        **label,
        "dtype": "bfloat16",
        "device": common.device_name(device),
        "p50_ms": p50,
        "p20_ms": p20,
        "p80_ms": p80,
        "tokens_per_s": seq / (p50 * 1e-3),
        "peak_mem_mb": peak,
    }


def _label(provider: str, shape: str, checkpointing: bool) -> dict:
    return {"op": "train step" + (" +ckpt" if checkpointing else ""), "provider": provider, "shape": shape}


def _bench_side_by_side(models: dict, rec, shape, ids, device, repeats) -> None:
    """CPU: every provider's step per checkpointing mode, sampled in turns (common.time_side_by_side)."""
    for checkpointing in (False, True):
        steps = {p: _step_fn(model, ids, checkpointing) for p, model in models.items()}
        timings = common.time_side_by_side(steps, device, repeats)
        for provider in models:
            label = _label(provider, shape, checkpointing)
            rec.attempt(label, lambda label=label, t=timings[provider]: [_row(label, t, ids.shape[1], device)])


def _bench_provider(provider, rec, shape, make, ids, device, repeats, modes) -> None:
    model = rec.build({"provider": provider, "shape": shape}, make)
    for checkpointing in modes if model is not None else ():
        label = _label(provider, shape, checkpointing)
        rec.attempt(label, lambda label=label, ckpt=checkpointing: [_measure(model, ids, ckpt, label, device, repeats)])


def run_suite(device: str, quick: bool, out: Path, rates: dict | None = None, repeats: int = 3):
    """One training step per provider and checkpointing mode; writes the files. Returns (rows, meta, paths)."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    rates = rates or common.device_rates(device)
    on_gpu = device == "cuda" and not quick
    config = LlamaConfig(**(GPU_CONFIG if on_gpu else CPU_CONFIG))
    seq = 2048 if on_gpu else 64
    dtype = torch.bfloat16
    dense_state = _empty_model(config, device, dtype).state_dict()
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    rec = common.Recorder("e2e", device, out)
    shared: dict[str, str] = {}
    shape = f"{config.num_hidden_layers}L h{config.hidden_size} seq{seq}"
    providers = common.peer_providers()
    models = {}  # CPU: every provider's (small) model at once, timed side by side
    for provider in [providers[0], "qft-fused", *providers[1:]]:
        if not common.wanted("providers", provider):
            continue

        def make(p=provider):
            model = build(p, dense_state, config, device, dtype)
            shared[p] = apply_shared_kernels(model, device)
            return model

        if device != "cuda":
            model = rec.build({"provider": provider, "shape": shape}, make)
            if model is not None:
                models[provider] = model
            continue
        modes = (True,) if on_gpu else (False, True)  # the full model trains with checkpointing
        _bench_provider(provider, rec, shape, make, ids, device, repeats, modes)
        torch.cuda.empty_cache()
    if models:
        _bench_side_by_side(models, rec, shape, ids, device, repeats)
    rows = rec.rows
    for row in rows:
        for peer in ("peft-bf16", "peft-bnb"):
            row[f"vs_{peer.replace('-', '_')}"] = common.ratio(rows, row, peer)
    meta = {
        "suite": "e2e",
        "device": device,
        "device_name": common.device_name(device),
        "versions": common.versions(),
        **rates,
        "config": config.to_dict() if hasattr(config, "to_dict") else {},
        "note": "" if on_gpu else CPU_NOTE,
        "shared_kernels": shared,
    }
    meta["config"] = {k: meta["config"].get(k) for k in GPU_CONFIG}
    return rows, meta, common.write_results("e2e", device, rows, meta, out, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print a markdown table, write JSON/CSV/MD under the results folder."""
    return common.suite_main(argv, __doc__, run_suite, COLUMNS, CPU_NOTE)


if __name__ == "__main__":
    sys.exit(main())

"""Twin models for comparisons: PEFT LoRA over bitsandbytes Linear4bit, and qft over the same bytes."""

from __future__ import annotations

import torch
from torch import nn

import qft


class TwoLayer(nn.Module):
    """A tiny MLP: fc1 -> GELU -> fc2.

    Widths are multiples of 64: bitsandbytes' AVX-512 CPU dequantize decodes wrong weights when
    in_features % 64 != 0 and in_features % 16 == 0 (REFERENCE.md), which would make it a false
    oracle, and its CPU inference kernel needs out_features divisible by its tile.
    """

    def __init__(self, k=64, hidden=128, n=64, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(k, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, n, dtype=dtype)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def bnb_twin(dense: TwoLayer, dtype) -> TwoLayer:
    """``dense`` with both layers as bitsandbytes nf4 (double quant) Linear4bit."""
    import bitsandbytes as bnb

    model = TwoLayer(dense.fc1.in_features, dense.fc1.out_features, dense.fc2.out_features, dtype)
    for name in ("fc1", "fc2"):
        src = getattr(dense, name)
        layer = bnb.nn.Linear4bit(
            src.in_features, src.out_features, compute_dtype=dtype, quant_type="nf4", compress_statistics=True
        )
        layer.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
        setattr(model, name, layer.to("cpu"))  # bitsandbytes quantizes on .to()
    return model


def bnb_peft_model(dense: TwoLayer, dtype, r=8, alpha=16, dropout=0.0):
    """PEFT LoRA over bitsandbytes nf4 (double quant) copies of ``dense``'s layers."""
    from peft import LoraConfig, get_peft_model

    model = bnb_twin(dense, dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["fc1", "fc2"])
    return get_peft_model(model, config)


def qft_twin(peft_model, dtype, r=8, alpha=16, dropout=0.0):
    """A qft model reading the PEFT model's bitsandbytes bytes and copying its adapters."""
    base = peft_model.base_model.model
    model = TwoLayer(base.fc1.in_features, base.fc1.out_features, base.fc2.out_features, dtype)
    qft.quantize_(model)
    for name in ("fc1", "fc2"):
        getattr(model, name).load_state_dict(getattr(base, name).base_layer.state_dict())
        getattr(model, name).bias.data = getattr(model, name).bias.data.to(dtype)
    qft.add_adapters(model, qft.LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=("fc1", "fc2")))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            peft_layer, ours = getattr(base, name), getattr(model, name)
            ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
            ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    return model


def randomize_lora_B(peft_model, std=0.05):
    """PEFT initialises B to zero; give it values so the adapter path shows in outputs and grads."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def oft_twins(dense: TwoLayer, dtype, block_size, terms=5, neumann=True, share=False, coft=False):
    """(PEFT OFT over bitsandbytes nf4, qft OFT over the same bytes), with the same random R params."""
    from peft import OFTConfig, get_peft_model

    model = bnb_twin(dense, dtype)
    config = OFTConfig(
        r=0,
        oft_block_size=block_size,
        target_modules=["fc1", "fc2"],
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
        block_share=share,
        coft=coft,
        eps=6e-5,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "oft_R" in name:
                p.normal_(0, 0.05)
    base = peft_model.base_model.model
    ours = TwoLayer(base.fc1.in_features, base.fc1.out_features, base.fc2.out_features, dtype)
    qft.quantize_(ours)
    for name in ("fc1", "fc2"):
        getattr(ours, name).load_state_dict(getattr(base, name).base_layer.state_dict())
        getattr(ours, name).bias.data = getattr(ours, name).bias.data.to(dtype)
    qft.add_adapters(ours, qft.OFTConfig(block_size, terms, neumann, share, coft, target_modules=("fc1", "fc2")))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(ours, name).oft_R.weight.copy_(getattr(base, name).oft_R["default"].weight)
    return peft_model, ours

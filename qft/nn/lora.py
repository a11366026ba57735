"""LoRALinear: a frozen base layer (QuantLinear or nn.Linear) plus trainable LoRA adapters A and B."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from qft.nn.config import LoRAConfig, QuantConfig
from qft.nn.quant_linear import QuantLinear


def _device_of(layer: nn.Module) -> torch.device:
    return layer.weight.device


class LoRALinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, PEFT's LoRA layer.

    ``lora_A`` / ``lora_B`` are ``nn.Linear`` without bias (``lora_A.weight`` [r, in], ``lora_B.weight``
    [out, r]) in ``config.adapter_dtype``, initialised as PEFT does: A kaiming-uniform(a=sqrt(5)),
    B zero, so a fresh adapter leaves the output unchanged. Over a QuantLinear the whole layer runs
    as one fused ``qft.functional.lora_linear``.
    """

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, (QuantLinear, nn.Linear)):
            raise TypeError(f"base_layer must be a QuantLinear or nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
        self.base_layer = base_layer
        self.config = config  # the model-wide config; ``name`` picks this layer's rank_pattern / alpha_pattern entry
        self.r = config.rank_for(name)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        kwargs = {"bias": False, "device": _device_of(base_layer), "dtype": config.adapter_dtype}
        self.lora_A = nn.Linear(self.in_features, self.r, **kwargs)
        self.lora_B = nn.Linear(self.r, self.out_features, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.scaling_for(name)
        self.merged = False

    @classmethod
    def with_loftq(cls, linear: nn.Linear, config: LoRAConfig, quant_config: QuantConfig, name: str = "") -> LoRALinear:
        """Quantize ``linear`` with ``quant_config`` and start A, B from LoftQ (``qft.nn.loftq``)."""
        from qft.nn.loftq import loftq

        own = dataclasses.replace(config, r=config.rank_for(name), alpha=config.alpha_for(name), rank_pattern={},
                                  alpha_pattern={})  # fmt: skip
        qt, a, b = loftq(linear.weight, quant_config, own)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = cls(QuantLinear(qt, bias), config, name)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., out]`` in x's dtype."""
        if self.merged:
            return self.base_layer(x)
        dropout = self.config.dropout if self.training else 0.0
        base = self.base_layer
        if isinstance(base, QuantLinear):
            return base.forward_with_lora(x, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout)
        y = base(x)
        x_lora = nn.functional.dropout(x, dropout, self.training).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(x_lora)) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32: what merging adds to the base weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def merge(self) -> None:
        """Fold the adapter into the base weight (a 4-bit base is re-quantized: lossy, as in PEFT)."""
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (a 4-bit base is re-quantized again)."""
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, QuantLinear):  # re-quantized (set_weight warns)
            base.set_weight(base.dequantize(torch.float32) + delta)
        else:
            base.weight += delta.to(base.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.config.dropout}, merged={self.merged}"

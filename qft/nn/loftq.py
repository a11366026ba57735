"""LoftQ initialization (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization"): alternate
quantizing ``W - scaling * B @ A`` and a rank-r SVD of the quantization residual, so that the
quantized base plus the initial adapter starts close to the full-precision weight."""

from __future__ import annotations

import math

import torch

from qft.nn.config import LoRAConfig, QuantConfig
from qft.tensor import QuantizedTensor, quantize


@torch.no_grad()
def loftq(
    weight: torch.Tensor, quant_config: QuantConfig, lora_config: LoRAConfig
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """``(qt, A [r, in], B [out, r])`` with ``dequantize(qt) + scaling * B @ A ~= weight``.

    ``lora_config.loftq_iters`` rounds; A and B come back in ``lora_config.adapter_dtype``.
    """
    w = weight.detach().float()
    r, scaling = lora_config.r, lora_config.scaling
    correction = torch.zeros_like(w)
    for _ in range(lora_config.loftq_iters):
        qt = quantize((w - correction).to(weight.dtype), quant_config.format, quant_config.block_size,
                      quant_config.double_quant, quant_config.method)  # fmt: skip
        residual = w - qt.dequantize(torch.float32)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:r].sqrt() / math.sqrt(scaling)
        b = u[:, :r] * root
        a = root.unsqueeze(1) * vh[:r]
        correction = scaling * (b @ a)
    return qt, a.to(lora_config.adapter_dtype), b.to(lora_config.adapter_dtype)

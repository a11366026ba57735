"""The large-M path of both GPU backends: decode the weight into a reused scratch buffer (never kept
across calls) and let cuBLAS run one GEMM whose ``beta * C`` epilogue adds the bias and LoRA term."""

from __future__ import annotations

import torch

from qft import formats
from qft.ops import scratch


def decoded(weight: formats.Weight, rows: int, dtype: torch.dtype, decode) -> torch.Tensor:
    """``[rows, numel / rows]`` dense weight in ``dtype``: ``decode(weight, dtype, out)`` into scratch."""
    out = scratch.buffer(weight.device, dtype, weight.numel)
    return decode(weight, dtype, out).view(rows, -1)


def linear(x, w, bias, lora_xa, lora_B, scaling: float) -> torch.Tensor:
    """``x @ w^T + bias + scaling * lora_xa @ lora_B^T`` as one addmm (the LoRA term rounded to x's dtype)."""
    epilogue = None
    if lora_xa is not None:
        epilogue = (scaling * (lora_xa @ lora_B.t())).to(x.dtype)
        if bias is not None:
            epilogue += bias
    elif bias is not None:
        epilogue = bias.to(x.dtype).expand(x.shape[0], w.shape[0])
    return x @ w.t() if epilogue is None else torch.addmm(epilogue, x, w.t())


def linear_grad_input(grad, w, lora_grad_xa, lora_A, dropout_mask, dropout_scale: float) -> torch.Tensor:
    """``grad @ w + (lora_grad_xa @ lora_A) * mask * dropout_scale`` as one addmm."""
    if lora_grad_xa is None:
        return grad @ w
    lora = lora_grad_xa @ lora_A
    if dropout_mask is not None:
        lora *= dropout_mask * dropout_scale
    return torch.addmm(lora.to(grad.dtype), grad, w)

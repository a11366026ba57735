"""The reference backend: pure torch, the CPU path and the oracle (``qft.formats`` and
``qft.reference`` fix the arithmetic that the kernels reproduce)."""

from __future__ import annotations

import torch

from qft import formats, reference


def quantize(w: torch.Tensor, fmt: str, block_size: int, method: str, nested: bool) -> formats.Weight:
    """``qft.formats.quantize``: the format's reference encode (and double quantization)."""
    return formats.quantize(w, fmt, block_size, method, nested)


def dequantize(weight: formats.Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``qft.formats.dequantize`` into ``out`` (copied) or a new tensor."""
    decoded = formats.dequantize(weight, dtype)
    return decoded if out is None else out.copy_(decoded)


def decoded_matrix(weight: formats.Weight, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[rows, numel / rows]`` weight in ``dtype`` (float64 decodes in fp32: gradcheck)."""
    decode_dtype = torch.float32 if dtype == torch.float64 else dtype
    return formats.dequantize(weight, decode_dtype).view(rows, -1).to(dtype)


# linear and linear_grad_input take the decode as ``decode(weight, rows, dtype)``: this module's, or the CPU
# backend's (``backend_cpu``), which gives the same values as fp32 and so the same GEMMs.


def linear(x, weight, bias, lora_xa, lora_B, scaling: float, decode=decoded_matrix) -> torch.Tensor:
    """``qft::quant_linear`` by ``qft.reference.quant_linear`` (an OFT x arrives rotated)."""
    w = decode(weight, weight.numel // x.shape[1], x.dtype)
    return reference.quant_linear(x, w, bias, lora_xa, lora_B, scaling)


def lora_backward(grad, weight, x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x, grad_input=None):
    """``qft::quant_lora_backward`` by ``qft.reference.lora_backward`` (fp32 LoRA terms); grad_x by
    ``grad_input`` (``linear_grad_input``'s arguments; default: this module's)."""
    grad_input = grad_input or linear_grad_input

    def grad_x(grad_xa):
        return grad_input(grad, weight, grad_xa, lora_A, mask, dropout_scale)

    return reference.lora_backward(grad, x_lora, xa, lora_A, lora_B, scaling, need_x, grad_x)


def linear_grad_input(
    grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale: float, decode=decoded_matrix
) -> torch.Tensor:
    """``qft::quant_linear_grad_input`` by ``qft.reference.quant_linear_grad_input``."""
    w = decode(weight, grad.shape[1], grad.dtype)
    return reference.quant_linear_grad_input(grad, w, lora_grad_xa, lora_A, dropout_mask, dropout_scale)

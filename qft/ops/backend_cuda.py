"""The CUDA-extension backend (``qft._C``, reached only through ``cuda_calls``): decode, the nf4/fp4
encoder and the small-M decode GEMV; the fused small-M matmul and the range search are Triton's."""

from __future__ import annotations

import torch

from qft import formats
from qft.ops import backend_triton, cuda_calls, gemm
from qft.ops.dispatch import cuda_stream, device_guard
from qft.ops.thresholds import fused_max_m, gemv_max_m, gemv_splits


def quantize(w: torch.Tensor, fmt: str, block_size: int, method: str, nested: bool) -> formats.Weight:
    """nf4/fp4 by the CUDA encoder; the other formats as the Triton backend quantizes them."""
    if not formats.is_bnb_codebook(fmt):
        return backend_triton.search_then_encode(w, fmt, block_size, method, nested)
    w = w.contiguous()
    codes = torch.empty(formats.packed_numel(w.numel(), 4), dtype=torch.uint8, device=w.device)
    scales = torch.empty(formats.num_blocks(w.numel(), block_size), dtype=torch.float32, device=w.device)
    with device_guard(w.device):
        cuda_calls.quantize_codebook4(w, codes, scales, fmt, block_size, cuda_stream(w.device))
    return formats.encoded({"codes": codes, "scales": scales}, fmt, w.numel(), block_size, nested)


def dequantize(weight: formats.Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every format through the extension's decode."""
    if out is None:
        out = torch.empty(weight.numel, dtype=dtype, device=weight.device)
    weight = weight.map(torch.Tensor.contiguous)  # held in this frame until the launch is queued
    with device_guard(weight.device):
        cuda_calls.dequantize(weight, out, cuda_stream(weight.device))
    return out


def linear(x, weight, bias, lora_xa, lora_B, scaling: float) -> torch.Tensor:
    """M <= ``gemv_max_m``: the decode GEMV; M <= ``fused_max_m``: Triton's fused kernel; else ``gemm``."""
    m = x.shape[0]
    if m <= gemv_max_m(x.device):
        return _gemv(x, weight, bias, lora_xa, lora_B, scaling)
    if m <= fused_max_m(x.device):
        return backend_triton.linear(x, weight, bias, lora_xa, lora_B, scaling)
    if lora_xa is not None and gemm.beside(x.shape[1]):
        return gemm.lora_forward(x, weight, bias, lora_xa, lora_B, scaling, dequantize)
    w = gemm.decoded(weight, weight.numel // x.shape[1], x.dtype, dequantize)
    return gemm.linear(x, w, bias, lora_xa, lora_B, scaling)


def lora_backward(grad, weight, x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x):
    """``gemm.lora_backward_any`` with the extension's decode."""
    args = (x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x)
    return gemm.lora_backward_any(grad, weight, *args, dequantize)


def linear_grad_input(grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale: float) -> torch.Tensor:
    """Decode into scratch with the extension, then one GEMM (``gemm``)."""
    w = gemm.decoded(weight, grad.shape[1], grad.dtype, dequantize)
    return gemm.linear_grad_input(grad, w, lora_grad_xa, lora_A, dropout_mask, dropout_scale)


def _gemv(x, weight, bias, xa, lora_b, scaling: float) -> torch.Tensor:
    m = x.shape[0]
    if m > cuda_calls.max_gemv_rows():
        raise ValueError(f"quant_gemv serves at most {cuda_calls.max_gemv_rows()} rows, got {m}")
    # Locals keep every contiguous copy alive until the launch has been queued.
    x = x.contiguous()
    weight = weight.map(torch.Tensor.contiguous)
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    xa = xa.float().contiguous() if xa is not None else None
    lora_b = lora_b.float().contiguous() if lora_b is not None else None
    n = weight.numel // x.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    splits = gemv_splits(x.device, n, x.shape[1])
    workspace = torch.empty(splits * m * n, device=x.device) if splits > 1 else None
    with device_guard(x.device):
        cuda_calls.quant_gemv(x, weight, bias, xa, lora_b, scaling, y, cuda_stream(x.device), workspace)
    return y

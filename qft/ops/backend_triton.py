"""The Triton backend (GPUs without the CUDA extension; CPU tensors under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import torch

from qft import formats
from qft.ops import gemm
from qft.ops.thresholds import fused_max_m


def quantize(w: torch.Tensor, fmt: str, block_size: int, method: str, nested: bool) -> formats.Weight:
    """nf4/fp4 encoded by their Triton kernel; other formats' costly range search in Triton, the
    elementwise rest in torch (``qft.formats``)."""
    if formats.is_bnb_codebook(fmt):
        from qft.kernels.quantize_codebook4 import quantize_codebook4

        codes, scales = quantize_codebook4(w, block_size, fmt)
        return formats.encoded({"codes": codes, "scales": scales}, fmt, w.numel(), block_size, nested)
    return search_then_encode(w, fmt, block_size, method, nested)


def search_then_encode(w, fmt: str, block_size: int, method: str, nested: bool) -> formats.Weight:
    """A searched code book or affine format: the Triton range search, then ``qft.formats.quantize``.
    ICQ's entropy search (an ``_icq`` code book, or method ``"icq"``) runs as batched torch ops on w's
    device (``qft.formats.icq``)."""
    if method == "icq" or isinstance(formats.get_format(fmt), formats.icq.IcqCodebookFormat):
        return formats.quantize(w, fmt, block_size, method, nested)
    from qft.kernels.search_scales import search_scales

    scales, zeros = search_scales(w, fmt, block_size, method)
    searched = {"scales": scales} if zeros is None else {"scales": scales, "zeros": zeros}
    return formats.quantize(w, fmt, block_size, method, nested, **searched)


def dequantize(weight: formats.Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """nf4/fp4 through the byte-pair kernel, every other format through the generic one."""
    if formats.is_bnb_codebook(weight.fmt):
        from qft.kernels.dequantize_codebook4 import dequantize_codebook4

        return dequantize_codebook4(weight, dtype, out)
    from qft.kernels.dequantize import dequantize

    return dequantize(weight, dtype, out)


def linear(x, weight, bias, lora_xa, lora_B, scaling: float) -> torch.Tensor:
    """M <= ``thresholds.fused_max_m``: the fused decode-in-matmul kernel; larger M: ``gemm``."""
    if x.shape[0] <= fused_max_m(x.device):
        from qft.kernels.quant_matmul import quant_matmul

        return quant_matmul(x, weight, bias, lora_xa, lora_B, scaling)
    if lora_xa is not None and gemm.beside(x.shape[1]):
        return gemm.lora_forward(x, weight, bias, lora_xa, lora_B, scaling, dequantize)
    w = gemm.decoded(weight, weight.numel // x.shape[1], x.dtype, dequantize)
    return gemm.linear(x, w, bias, lora_xa, lora_B, scaling)


def lora_backward(grad, weight, x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x):
    """``gemm.lora_backward_any`` with Triton's decode."""
    args = (x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x)
    return gemm.lora_backward_any(grad, weight, *args, dequantize)


def linear_grad_input(grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale: float) -> torch.Tensor:
    """Decode into scratch, then one GEMM (``gemm``)."""
    w = gemm.decoded(weight, grad.shape[1], grad.dtype, dequantize)
    return gemm.linear_grad_input(grad, w, lora_grad_xa, lora_A, dropout_mask, dropout_scale)

"""Custom ops of the quantized linear layer: ``qft::quant_linear`` (forward, LoRA epilogue optional)
and ``qft::quant_linear_grad_input`` (grad of x, LoRA term optional).

Paths, chosen by device and M (rows of x):

* CPU -> the weight is decoded in x's dtype and ``qft.reference`` does the fp32 arithmetic;
* GPU, M <= ``thresholds.gemv_max_m`` with the CUDA extension -> its decode GEMV (LoRA and bias
  folded into the same reduction);
* GPU, M <= ``thresholds.fused_max_m`` -> the Triton kernel that decodes inside the matmul and adds
  the LoRA term in its epilogue;
* GPU, larger M -> the weight is decoded into a reused per-device scratch buffer (never kept) and
  cuBLAS runs one GEMM whose ``beta * C`` epilogue adds the bias and the LoRA term.
"""

from __future__ import annotations

import torch

from qft import formats, reference
from qft.ops import cuda_calls, scratch, thresholds
from qft.ops.dispatch import FLOAT_DTYPES, backend_for, cuda_stream, device_guard
from qft.ops.oft import oft_rotate, triton_rotates
from qft.ops.quant import check_quantized_parts, cuda_weight_parts, dequantize_4bit_into, dequantize_lowbit_into


def _decode(backend, packed, absmax, nested_absmax, offset, zero, block_size, fmt, shape, dtype, nested_block_size):
    """The dense [N, K] weight in ``dtype``: allocated on the reference path, a scratch view otherwise."""
    numel = shape[0] * shape[1]
    decode_dtype = torch.float32 if dtype == torch.float64 else dtype  # float64: gradcheck only
    out = None if backend == "reference" else scratch.buffer(packed.device, decode_dtype, numel)
    parts = (packed, absmax, nested_absmax, offset)
    if formats.is_4bit_codebook(fmt):
        weight = dequantize_4bit_into(out, backend, *parts, block_size, fmt, numel, decode_dtype, nested_block_size)
    else:
        weight = dequantize_lowbit_into(
            out, backend, *parts, zero, block_size, fmt, numel, decode_dtype, nested_block_size
        )
    return weight.view(shape).to(dtype)


def _check(x, name, packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, nested_block_size):
    formats.check_block_size(block_size, fmt)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, features], got shape {tuple(x.shape)}")
    if x.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    check_quantized_parts(packed, absmax, nested_absmax, offset, numel, block_size, nested_block_size, fmt, zero)


@torch.library.custom_op("qft::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    zero: torch.Tensor | None,
    block_size: int,
    fmt: str,
    out_features: int,
    nested_block_size: int,
    bias: torch.Tensor | None,
    lora_xa: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    rot: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x' @ W^T + bias + scaling * lora_xa @ lora_B^T``; x [M, K], W [out_features, K] quantized.

    x' is x, or with ``rot`` [K / b, b, b] (OFT) x rotated block by block in fp32 and rounded back
    to x's dtype. Accumulates in fp32 and returns y [M, out_features] in x's dtype. ``lora_xa``
    [M, r] and ``lora_B`` [out_features, r] (both or neither) may be fp32 over a bf16/fp16 x.
    """
    m, k = x.shape
    parts = (packed, absmax, nested_absmax, offset)
    _check(x, "x", *parts, zero, block_size, fmt, out_features * k, nested_block_size)
    backend = backend_for(x.device)
    # The fused small-M kernel rotates in its prologue (b >= 16, tl.dot); elsewhere rotate first.
    fused_rotation = rot is not None and rot.shape[1] >= 16 and triton_rotates(x, rot.shape[1])
    if rot is not None and not (fused_rotation and m <= thresholds.fused_max_m(x.device)):
        x = oft_rotate(x, rot, False)
        rot = None
    if backend == "reference" or x.dtype == torch.float64:
        weight = _decode("reference", *parts, zero, block_size, fmt, (out_features, k), x.dtype, nested_block_size)
        return reference.quant_linear(x, weight, bias, lora_xa, lora_B, scaling)
    if rot is None and backend == "cuda" and m <= thresholds.gemv_max_m(x.device):
        return _gemv_cuda(x, *parts, zero, block_size, fmt, out_features, nested_block_size, bias, lora_xa, lora_B,
                          scaling)  # fmt: skip
    if m <= thresholds.fused_max_m(x.device):
        from qft.kernels.quant_matmul import quant_matmul as fused

        return fused(
            x, *parts, block_size, fmt, out_features, bias, lora_xa, lora_B, scaling, nested_block_size, zero, rot
        )
    weight = _decode(backend, *parts, zero, block_size, fmt, (out_features, k), x.dtype, nested_block_size)
    epilogue = None
    if lora_xa is not None:
        epilogue = (scaling * (lora_xa @ lora_B.t())).to(x.dtype)
        if bias is not None:
            epilogue += bias
    elif bias is not None:
        epilogue = bias.to(x.dtype).expand(m, out_features)
    if epilogue is None:
        return x @ weight.t()
    return torch.addmm(epilogue, x, weight.t())


def _gemv_cuda(x, packed, absmax, nested_absmax, offset, zero, block_size, fmt, n, nested_block_size, bias, xa, lora_b,
               s):  # fmt: skip
    """The CUDA decode GEMV, every format: code-book formats pass their code book, affine ones ``zero``."""
    m = x.shape[0]
    if m > cuda_calls.max_gemv_rows():
        raise ValueError(f"quant_gemv serves at most {cuda_calls.max_gemv_rows()} rows, got {m}")
    # Locals keep every contiguous copy alive until the launch has been queued.
    x = x.contiguous()
    packed, absmax, nested_absmax, offset, zero, code = cuda_weight_parts(packed, absmax, nested_absmax, offset,
                                                                          zero, fmt)  # fmt: skip
    bias = bias.to(x.dtype).contiguous() if bias is not None else None
    xa = xa.float().contiguous() if xa is not None else None
    lora_b = lora_b.float().contiguous() if lora_b is not None else None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    with device_guard(x.device):
        cuda_calls.quant_gemv(
            x, packed, formats.get_format(fmt).bits, zero, absmax, nested_absmax, offset,
            formats.dynamic_map(x.device), code, block_size, nested_block_size, bias, xa, lora_b, s, y,
            cuda_stream(x.device),
        )  # fmt: skip
    return y


@quant_linear.register_fake
def _(x, packed, absmax, nested_absmax, offset, zero, block_size, fmt, out_features, nested_block_size, *rest):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("qft::quant_linear_grad_input", mutates_args=())
def quant_linear_grad_input(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    zero: torch.Tensor | None,
    block_size: int,
    fmt: str,
    in_features: int,
    nested_block_size: int,
    lora_grad_xa: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
) -> torch.Tensor:
    """``grad_x = grad @ W + (lora_grad_xa @ lora_A) * dropout_mask * dropout_scale``.

    grad [M, N]; W [N, in_features] 4-bit, decoded again (never saved); ``lora_grad_xa`` [M, r] is
    the gradient reaching ``dropout(x) @ A^T`` (scaling included); ``dropout_mask`` [M, K] bool or
    None. Returns grad_x [M, in_features] in grad's dtype.
    """
    n = grad.shape[1]
    parts = (packed, absmax, nested_absmax, offset, zero)
    _check(grad, "grad", *parts, block_size, fmt, n * in_features, nested_block_size)
    backend = backend_for(grad.device)
    if grad.dtype == torch.float64:
        backend = "reference"
    weight = _decode(backend, *parts, block_size, fmt, (n, in_features), grad.dtype, nested_block_size)
    if backend == "reference":
        return reference.quant_linear_grad_input(grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale)
    if lora_grad_xa is None:
        return grad @ weight
    lora = lora_grad_xa @ lora_A
    if dropout_mask is not None:
        lora *= dropout_mask * dropout_scale
    return torch.addmm(lora.to(grad.dtype), grad, weight)


@quant_linear_grad_input.register_fake
def _(grad, packed, absmax, nested_absmax, offset, zero, block_size, fmt, in_features, nested_block_size, *rest):
    return grad.new_empty((grad.shape[0], in_features))

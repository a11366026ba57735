"""Every ``qft::`` op over a quantized weight, declared once with its fake (shape-only) version.

A weight is three arguments, ``Tensor?[] parts, str fmt, int[] meta`` (``qft.formats.Weight.op_args``).
Each op checks its inputs, picks the backend for the tensors' device (``dispatch.backend_for``) and
calls that backend's implementation (``backend_reference``, ``backend_cpu``, ``backend_triton``,
``backend_cuda``).
"""

from __future__ import annotations

import torch

from qft import formats, reference
from qft.ops import backend_cpu, backend_cuda, backend_reference, backend_triton, eager, gemm
from qft.ops.dispatch import FLOAT_DTYPES, GPU_BACKENDS, backend_for
from qft.ops.oft import oft_rotate
from qft.ops.thresholds import fused_max_m

BACKEND_MODULES = {"reference": backend_reference, "cpu": backend_cpu, "triton": backend_triton, "cuda": backend_cuda}
# The backends that run the reference's paths (their own kernels inside): the GPU-only paths are not theirs.
REFERENCE_PATHS = tuple(module for name, module in BACKEND_MODULES.items() if name not in GPU_BACKENDS)


def _backend(device: torch.device):
    return BACKEND_MODULES[backend_for(device)]


def _weight(parts, fmt: str, meta) -> formats.Weight:
    return formats.check_weight(formats.Weight.from_op_args(parts, fmt, meta))


def _check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {dtype}")


@torch.library.custom_op("qft::quantize", mutates_args=())
def quantize(w: torch.Tensor, fmt: str, block_size: int, method: str, nested: bool) -> list[torch.Tensor]:
    """Quantize ``w`` (fp32/fp16/bf16, any shape, finite) blockwise: the stored parts in
    ``qft.formats.parts.NAMES`` order, absent ones left out (``qft.formats.layout`` names them)."""
    formats.check_block_size(block_size, fmt)
    _check_dtype(w.dtype, "w")
    if w.numel() == 0:  # nothing to encode: zero-size parts (and a zero offset)
        return [t.zero_() for t in _empty_parts(w, fmt, block_size, nested)]
    weight = _backend(w.device).quantize(w, fmt, block_size, method, nested)
    return [weight.parts[name] for name in formats.stored_names(fmt, nested)]


def _empty_parts(w, fmt: str, block_size: int, nested: bool) -> list[torch.Tensor]:
    specs = formats.layout(formats.get_format(fmt), w.numel(), block_size, nested, formats.NESTED_BLOCK_SIZE)
    return [w.new_empty((s.numel,) if s.dims else (), dtype=s.dtype) for s in specs]


@quantize.register_fake
def _(w, fmt, block_size, method, nested):
    return _empty_parts(w, fmt, block_size, nested)


@torch.library.custom_op("qft::dequantize", mutates_args=())
def dequantize(parts: list[torch.Tensor | None], fmt: str, meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Decode every value of the weight to a flat ``dtype`` tensor (bit-identical on every backend)."""
    weight = _weight(parts, fmt, meta)
    _check_dtype(dtype, "dtype")
    if weight.numel == 0:
        return weight.codes.new_empty((0,), dtype=dtype)
    return _backend(weight.device).dequantize(weight, dtype)


@dequantize.register_fake
def _(parts, fmt, meta, dtype):
    return parts[0].new_empty((meta[0],), dtype=dtype)


def _check_input(x: torch.Tensor, name: str, weight: formats.Weight) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, features], got shape {tuple(x.shape)}")
    if x.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.shape[1] == 0 or weight.numel % x.shape[1]:
        raise ValueError(f"{name}'s {x.shape[1]} features do not divide the weight's {weight.numel} values")


@eager.custom_op("qft::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    parts: list[torch.Tensor | None],
    fmt: str,
    meta: list[int],
    bias: torch.Tensor | None,
    lora_xa: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    rot: torch.Tensor | None = None,
    blockdiag: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x' @ W^T + bias + scaling * lora_xa @ lora_B^T``; x [M, K], W [numel / K, K] quantized.

    x' is x, or with ``rot`` [K / b, b, b] (OFT) x rotated block by block in fp32 and rounded back
    to x's dtype (on the GPU backends at large M with M >= N the equal ``x @ (W R^T)^T``, W R^T
    rounded instead: ``gemm.rotates_weight``). Accumulates in fp32 and returns y [M, N] in x's
    dtype. ``lora_xa`` [M, r] and ``lora_B`` [N, r] (both or neither) may be fp32 over a bf16/fp16 x.
    ``blockdiag`` D [n, N / n, K / n] (DiaBlo; not with LoRA or ``rot``) adds ``x @ blockdiag(D)^T``: in D's
    dtype to the rounded base output (``reference.blockdiag_linear``), or on the GPU backends at large M
    to the decoded weight in x's dtype (``gemm.blockdiag_weight_linear``: one GEMM).
    """
    weight = _weight(parts, fmt, meta)
    _check_input(x, "x", weight)
    backend = backend_reference if x.dtype == torch.float64 else _backend(x.device)
    m, n = x.shape[0], weight.numel // x.shape[1]
    large = backend not in REFERENCE_PATHS and m > fused_max_m(x.device)
    if blockdiag is not None:
        if rot is not None or lora_xa is not None:
            raise ValueError("blockdiag does not combine with rot or LoRA")
        _check_blockdiag(blockdiag, n, x.shape[1])
        if large:
            return gemm.blockdiag_weight_linear(x, weight, bias, blockdiag, backend.dequantize)
        y = backend.linear(x, weight, bias, None, None, 0.0)
        return (y.to(blockdiag.dtype) + reference.blockdiag_linear(x, blockdiag)).to(x.dtype)
    if rot is not None:
        # Large M with M >= N on a GPU backend: rotate the decoded weight, not x. Otherwise x is
        # rotated once (one read of R) and every M takes the same kernels as a plain layer (a rotation
        # inside the matmul kernels would read R again in every program along N).
        if large and gemm.rotates_weight(m, n):
            return gemm.rotated_weight_linear(x, weight, bias, rot, backend.dequantize)
        x = eager.call(oft_rotate, x, rot, False)
    return backend.linear(x, weight, bias, lora_xa, lora_B, scaling)


def _check_blockdiag(blocks: torch.Tensor, n: int, k: int) -> None:
    if blocks.dim() != 3 or not blocks.is_floating_point():
        raise ValueError(f"blockdiag must be a 3-D floating tensor, got {tuple(blocks.shape)} {blocks.dtype}")
    count, rows, cols = blocks.shape
    if count * rows != n or count * cols != k:
        raise ValueError(f"blockdiag {tuple(blocks.shape)} does not tile the diagonal of a [{n}, {k}] weight")


@quant_linear.register_fake
def _(x, parts, fmt, meta, *rest):
    return x.new_empty((x.shape[0], meta[0] // x.shape[1]))


@eager.custom_op("qft::quant_linear_grad_input", mutates_args=())
def quant_linear_grad_input(
    grad: torch.Tensor,
    parts: list[torch.Tensor | None],
    fmt: str,
    meta: list[int],
    lora_grad_xa: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    blockdiag: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_x = grad @ W + (lora_grad_xa @ lora_A) * dropout_mask * dropout_scale``.

    grad [M, N]; W [N, numel / N] decoded again (never saved); ``lora_grad_xa`` [M, r] is the
    gradient reaching ``dropout(x) @ A^T`` (scaling included); ``dropout_mask`` [M, K] bool or None.
    ``blockdiag`` D (DiaBlo, not with LoRA) adds ``grad @ blockdiag(D)`` as ``quant_linear`` does: in D's
    dtype on the reference, inside the decoded weight on the GPU backends (they decode at every M).
    Returns grad_x [M, K] in grad's dtype.
    """
    weight = _weight(parts, fmt, meta)
    _check_input(grad, "grad", weight)
    backend = backend_reference if grad.dtype == torch.float64 else _backend(grad.device)
    if blockdiag is not None:
        if lora_grad_xa is not None:
            raise ValueError("blockdiag does not combine with LoRA")
        _check_blockdiag(blockdiag, grad.shape[1], weight.numel // grad.shape[1])
        if backend not in REFERENCE_PATHS:
            return gemm.blockdiag_weight_grad_input(grad, weight, blockdiag, backend.dequantize)
        base = backend.linear_grad_input(grad, weight, None, None, None, 1.0)
        return (base.to(blockdiag.dtype) + reference.blockdiag_linear(grad, blockdiag.transpose(1, 2))).to(grad.dtype)
    return backend.linear_grad_input(grad, weight, lora_grad_xa, lora_A, dropout_mask, dropout_scale)


@eager.custom_op("qft::quant_lora_backward", mutates_args=())
def quant_lora_backward(
    grad: torch.Tensor,
    parts: list[torch.Tensor | None],
    fmt: str,
    meta: list[int],
    x_lora: torch.Tensor | None,
    xa: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None,
    dropout_scale: float,
    need_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA's backward over a quantized layer: ``(grad_x, grad_a, grad_b)``.

    grad [M, N]; ``x_lora`` [M, K] = dropout(x) (None when A needs no gradient); ``xa`` [M, r] =
    ``x_lora @ A^T``; A [r, K], B [N, r] (one dtype). With grad_xa = s g B (the gradient reaching xa):
    grad_a = grad_xa^T x_lora and grad_b = s g^T xa in the adapters' dtype (empty without x_lora);
    grad_x = g W + (grad_xa A) * dropout_mask * dropout_scale in grad's dtype, or empty when not
    ``need_x``. The reference computes the LoRA terms in the adapters' dtype; the GPU backends run one
    GEMM over K + r (``gemm.lora_backward``: LoRA terms in grad's dtype, nothing M x N in fp32).
    """
    weight = _weight(parts, fmt, meta)
    _check_input(grad, "grad", weight)
    backend = backend_reference if grad.dtype == torch.float64 else _backend(grad.device)
    return backend.lora_backward(grad, weight, x_lora, xa, lora_A, lora_B, scaling, dropout_mask, dropout_scale, need_x)


@quant_lora_backward.register_fake
def _(grad, parts, fmt, meta, x_lora, xa, lora_A, lora_B, *rest):
    need_x = rest[-1]
    grad_x = grad.new_empty((grad.shape[0], meta[0] // grad.shape[1]) if need_x else (0,))
    grad_a = lora_A.new_empty(lora_A.shape if x_lora is not None else (0,))
    return grad_x, grad_a, lora_B.new_empty(lora_B.shape)


@quant_linear_grad_input.register_fake
def _(grad, parts, fmt, meta, *rest):
    return grad.new_empty((grad.shape[0], meta[0] // grad.shape[1]))

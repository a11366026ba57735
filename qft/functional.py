"""Autograd wrappers over the ``qft::`` linear ops: ``quant_linear`` and ``lora_linear``.

Each is a thin ``torch.autograd.Function`` with a hand-written backward. What they keep for
backward, by construction: x once in its own dtype (only when a LoRA A gradient needs it), the LoRA
intermediate ``dropout(x) @ A^T`` (M x r), the dropout mask (bool, only when dropout > 0), and the
packed weight itself. Never a dequantized weight (backward decodes it again) nor an fp32 copy of x.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch

from qft import ops, reference_oft
from qft.tensor import QuantizedTensor

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives ``F.linear`` on x's device right now, or None when off."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(dtype: torch.dtype, *tensors):
    return [t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors]


def _without_autocast(backward):
    """Run a backward with autocast off: it computes in the dtypes its forward chose, also when
    ``.backward()`` is called inside an autocast region."""

    @functools.wraps(backward)
    def run(ctx, grad):
        device_type = grad.device.type
        off = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
        with off:
            return backward(ctx, grad)

    return run


def _weight_args(qt: QuantizedTensor) -> tuple:
    return (qt.packed, qt.absmax, qt.nested_absmax, qt.offset, qt.zero, qt.block_size, qt.format)


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, qt):
        ctx.qt = qt
        ctx.bias_dtype = None if bias is None else bias.dtype
        out_features, _ = qt.shape
        return ops.quant_linear(
            x2d, *_weight_args(qt), out_features, qt.nested_block_size, bias, None, None, 0.0
        )  # fmt: skip

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        qt = ctx.qt
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.quant_linear_grad_input(
                grad, *_weight_args(qt), qt.shape[1], qt.nested_block_size, None, None, None, 1.0
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, lora_A, lora_B, bias, qt, scaling, dropout):
        adapter_dtype = lora_A.dtype
        mask = None
        x_lora = x2d
        if dropout > 0:
            mask = torch.rand(x2d.shape, device=x2d.device) >= dropout
            x_lora = x2d * mask / (1 - dropout)
        # The adapter path runs in the adapters' dtype (fp32 adapters over a bf16 base keep fp32
        # precision, as PEFT does), without keeping that copy of x.
        xa = x_lora.to(adapter_dtype) @ lora_A.t()
        out_features, _ = qt.shape
        y = ops.quant_linear(x2d, *_weight_args(qt), out_features, qt.nested_block_size, bias, xa, lora_B, scaling)
        needs_a, needs_b = ctx.needs_input_grad[1:3]
        ctx.save_for_backward(
            x2d if needs_a else None, lora_A, lora_B, xa if needs_b else None, mask
        )  # fmt: skip
        ctx.qt, ctx.scaling, ctx.dropout = qt, scaling, dropout
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, lora_A, lora_B, xa, mask = ctx.saved_tensors
        qt, scaling, dropout = ctx.qt, ctx.scaling, ctx.dropout
        needs_x, needs_a, needs_b, needs_bias = ctx.needs_input_grad[:4]
        grad_ad = grad.to(lora_A.dtype)
        grad_xa = scaling * (grad_ad @ lora_B)  # gradient reaching dropout(x) @ A^T
        grad_x = grad_a = grad_b = grad_bias = None
        if needs_x:
            grad_x = ops.quant_linear_grad_input(
                grad, *_weight_args(qt), qt.shape[1], qt.nested_block_size, grad_xa, lora_A, mask,
                1.0 / (1.0 - dropout),
            )  # fmt: skip
        if needs_a:
            x_lora = x2d if mask is None else x2d * mask / (1 - dropout)
            grad_a = grad_xa.t() @ x_lora.to(lora_A.dtype)
        if needs_b:
            grad_b = scaling * (grad_ad.t() @ xa)
        if needs_bias:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None


def _check_x(x, qt: QuantizedTensor) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"qt must hold a 2-D [out, in] weight, got shape {tuple(qt.shape)}")
    if not isinstance(x, torch.Tensor) or x.dtype not in (*_FLOATS, torch.float64):
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != qt.shape[1]:
        raise ValueError(f"x's last dimension must be in_features={qt.shape[1]}, got shape {tuple(x.shape)}")
    if x.device != qt.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {qt.device}")


def _check_bias(bias, qt: QuantizedTensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.shape != (qt.shape[0],):
        raise ValueError(f"bias must be a tensor of shape ({qt.shape[0]},), got {getattr(bias, 'shape', bias)}")
    if bias.device != qt.device:
        raise ValueError(f"bias is on {bias.device} but the quantized weight is on {qt.device}")


def quant_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W stored 4-bit in ``qt`` ([out, in]).

    Args:
        x: ``[..., in]`` fp32/fp16/bf16 (any leading shape); the output follows its dtype.
        qt: the frozen quantized weight, on x's device.
        bias: optional ``[out]``; gets a gradient if it requires one.

    Returns ``[..., out]``. Saved for backward: nothing but ``qt`` (W is decoded again for grad_x).
    Under ``torch.autocast`` it computes as ``nn.Linear`` does: x and bias in the autocast dtype.
    """
    _check_x(x, qt)
    _check_bias(bias, qt)
    dtype = _autocast_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            x, bias = _cast(dtype, x, bias)
            return quant_linear(x, qt, bias)
    lead = x.shape[:-1]
    y = _QuantLinear.apply(x.reshape(-1, x.shape[-1]), bias, qt)
    return y.view(*lead, qt.shape[0])


def lora_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """QLoRA linear: ``x @ W^T + bias + scaling * dropout(x) @ A^T @ B^T`` (PEFT's LoRA semantics).

    Args:
        x: ``[..., in]`` fp32/fp16/bf16; the output follows its dtype.
        qt: frozen 4-bit weight ``[out, in]`` on x's device.
        lora_A: ``[r, in]``; lora_B: ``[out, r]``; one float dtype (fp32 by default, as PEFT keeps them).
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        bias: optional ``[out]``.
        dropout: probability in [0, 1) applied to x on the adapter path only (pass 0 in eval).

    Returns ``[..., out]``. Saved for backward: x (its own dtype, only if A needs a gradient),
    ``dropout(x) @ A^T`` (M x r), the dropout mask (bool, if dropout > 0); never a decoded W.
    """
    _check_x(x, qt)
    _check_bias(bias, qt)
    out_features, in_features = qt.shape
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in (*_FLOATS, torch.float64):
            raise TypeError(f"{name} must be a 2-D floating tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    r = lora_A.shape[0]
    if r <= 0 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [r, {in_features}] with r > 0, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must be [{out_features}, {r}] to match lora_A, got {tuple(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite number, got {scaling!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    dtype = _autocast_dtype(x)
    if dtype is not None:  # as PEFT's LoRA over nn.Linear: base and adapters in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            x, lora_A, lora_B, bias = _cast(dtype, x, lora_A, lora_B, bias)
            return lora_linear(x, qt, lora_A, lora_B, scaling, bias, dropout)
    lead = x.shape[:-1]
    y = _LoRALinear.apply(x.reshape(-1, in_features), lora_A, lora_B, bias, qt, float(scaling), float(dropout))
    return y.view(*lead, out_features)


class _OFTLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, rot, bias, qt):
        out_features, _ = qt.shape
        # The rotation happens inside qft::quant_linear (fused into the small-M kernel's prologue).
        y = ops.quant_linear(x2d, *_weight_args(qt), out_features, qt.nested_block_size, bias, None, None, 0.0, rot)
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, rot)
        ctx.qt = qt
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, rot = ctx.saved_tensors
        qt = ctx.qt
        needs_x, needs_rot, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_rot = grad_bias = None
        if needs_x or needs_rot:
            grad_rotated = ops.quant_linear_grad_input(
                grad, *_weight_args(qt), qt.shape[1], qt.nested_block_size, None, None, None, 1.0
            )  # fmt: skip
            if needs_rot:  # one kernel: grad_x = g R^T and dL/dR = x^T g from one read of x and g
                grad_x, grad_rot = ops.oft_rotate_backward(x2d, grad_rotated, rot)
                grad_x = grad_x if needs_x else None
            else:
                grad_x = ops.oft_rotate(grad_rotated, rot, True)
        if needs_bias:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_rot, grad_bias, None


def oft_rotation(
    oft_weight: torch.Tensor,
    block_size: int,
    blocks: int,
    cayley_neumann_terms: int = 5,
    use_cayley_neumann: bool = True,
) -> torch.Tensor:
    """R ``[blocks, b, b]`` (differentiable) from OFT's skew parameters ``[blocks or 1, b(b-1)/2]``.

    Cayley-Neumann runs through ``qft::oft_rotation`` (one launch for all blocks on a GPU, closed-form
    backward); the exact Cayley transform through ``torch.linalg.solve``. One shared row is expanded
    to every block (block_share)."""
    if use_cayley_neumann and cayley_neumann_terms > 1:  # n = 1: R = I, unconnected to the parameters as in PEFT
        rot = ops.oft_rotation(oft_weight, block_size, cayley_neumann_terms)
    else:
        rot = reference_oft.rotation(oft_weight, block_size, cayley_neumann_terms, use_cayley_neumann)
    return rot.expand(blocks, block_size, block_size)


def oft_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    oft_weight: torch.Tensor,
    block_size: int,
    bias: torch.Tensor | None = None,
    cayley_neumann_terms: int = 5,
    use_cayley_neumann: bool = True,
) -> torch.Tensor:
    """QOFT linear: ``rotate(x) @ W^T + bias``, x rotated per block by R (PEFT >= 0.18's OFT).

    Args:
        x: ``[..., in]`` fp32/fp16/bf16; the output follows its dtype.
        qt: frozen quantized weight ``[out, in]``.
        oft_weight: ``[in / block_size, b(b-1)/2]`` skew parameters (strict upper triangles), or
            ``[1, b(b-1)/2]`` shared by every block (block_share); fp32 by default.
        block_size: b; must divide in_features (qft refuses what PEFT would silently adjust).
        cayley_neumann_terms / use_cayley_neumann: R's parametrization (see ``qft.reference_oft``).

    Returns ``[..., out]``. Saved for backward: x (its own dtype, only if the OFT parameters need a
    gradient) and R (``[in / b, b, b]``); never an fp32 copy of x or a decoded weight.
    """
    _check_x(x, qt)
    _check_bias(bias, qt)
    in_features = qt.shape[1]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    if in_features % block_size:
        raise ValueError(f"block_size {block_size} does not divide in_features {in_features}")
    blocks = in_features // block_size
    row = block_size * (block_size - 1) // 2
    if not isinstance(oft_weight, torch.Tensor) or oft_weight.dim() != 2 or oft_weight.shape[1] != row:
        raise ValueError(f"oft_weight must be [{blocks} or 1, {row}] for block_size {block_size}, "
                         f"got {tuple(getattr(oft_weight, 'shape', ()))}")  # fmt: skip
    if oft_weight.shape[0] not in (1, blocks):
        raise ValueError(f"oft_weight must have {blocks} rows (or 1 when shared), got {oft_weight.shape[0]}")
    if isinstance(cayley_neumann_terms, bool) or not isinstance(cayley_neumann_terms, int) or cayley_neumann_terms < 1:
        raise ValueError(f"cayley_neumann_terms must be a positive int, got {cayley_neumann_terms!r}")
    dtype = _autocast_dtype(x)
    if dtype is not None:  # x and bias in the autocast dtype; R is built and applied in fp32 as always
        with torch.autocast(x.device.type, enabled=False):
            x, bias = _cast(dtype, x, bias)
            return oft_linear(x, qt, oft_weight, block_size, bias, cayley_neumann_terms, use_cayley_neumann)
    rot = oft_rotation(oft_weight, block_size, blocks, cayley_neumann_terms, use_cayley_neumann)
    lead = x.shape[:-1]
    y = _OFTLinear.apply(x.reshape(-1, in_features), rot, bias, qt)
    return y.view(*lead, qt.shape[0])

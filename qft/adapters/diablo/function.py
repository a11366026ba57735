"""DiaBlo's math and autograd function over a quantized weight.

DiaBlo (Sun et al. 2025, "DiaBlo: Diagonal Blocks Are Sufficient For Finetuning LLMs") cuts the weight
W [out, in] into an N x N grid of blocks and trains only the N diagonal ones, initialised at zero:
``W' = W + blockdiag(D_1, ..., D_N)``, ``D_i`` [out / N, in / N]. So ``y = x W^T + bias + [x_1 D_1^T | ... |
x_N D_N^T]`` with ``x_i`` the i-th of N equal slices of x's features: no low-rank product, and the
update costs M x in x (out / N) multiply-adds.

Numerics as PEFT's adapters over a low-precision base: the delta in the adapters' dtype, added to the
base output there, the sum rounded to x's dtype; on a GPU at large M, D is added to the decoded weight's
diagonal blocks instead, so forward and grad_x stay one GEMM each (``qft::quant_linear``'s
``blockdiag``). That sum is rounded to x's dtype: with bf16 x, an entry of D below half a bf16 step of
its W entry (about 1e-4 for |W| = 0.05) is not seen there until it grows, while dD is always exact.

Kept for backward: x once in its own dtype (only when D needs a gradient) and D; never a decoded weight.
"""

from __future__ import annotations

import torch

from qft import ops
from qft.functional import _autocast_dtype, _cast, _check_bias, _check_x, _without_autocast
from qft.tensor import QuantizedTensor


def grad_blocks(x2d: torch.Tensor, grad: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """dD [n, rows, cols] of ``x @ blockdiag(D)^T``: ``dD_i = g_i^T x_i``, in D's dtype."""
    m = grad.shape[0]
    n, rows, cols = d.shape
    return torch.einsum("mbo,mbi->boi", grad.to(d.dtype).view(m, n, rows), x2d.to(d.dtype).view(m, n, cols))


class _DiaBloLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, d, bias, qt):
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, d)
        ctx.qt = qt
        ctx.bias_dtype = None if bias is None else bias.dtype
        return ops.quant_linear(x2d, *qt.op_args(), bias, None, None, 0.0, None, d)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, d = ctx.saved_tensors
        needs_x, needs_d, needs_bias = ctx.needs_input_grad[:3]
        grad_x = grad_d = grad_bias = None
        if needs_x:
            grad_x = ops.quant_linear_grad_input(grad, *ctx.qt.op_args(), None, None, None, 1.0, d)
        if needs_d:
            grad_d = grad_blocks(x2d, grad, d)
        if needs_bias:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_d, grad_bias, None


def diablo_linear(x: torch.Tensor, qt: QuantizedTensor, d: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ (W + blockdiag(D))^T + bias`` over a quantized W [out, in]; D [N, out/N, in/N] (any float dtype).

    Returns ``[..., out]`` in x's dtype; the base runs through ``qft::quant_linear``."""
    _check_x(x, qt)
    _check_bias(bias, qt)
    out_features, in_features = qt.shape
    if not isinstance(d, torch.Tensor) or d.dim() != 3 or not d.is_floating_point():
        raise TypeError(f"D must be a 3-D floating tensor, got {getattr(d, 'shape', type(d).__name__)}")
    n, rows, cols = d.shape
    if n * rows != out_features or n * cols != in_features:
        raise ValueError(f"D {tuple(d.shape)} does not tile a [{out_features}, {in_features}] weight's diagonal")
    dtype = _autocast_dtype(x)
    if dtype is not None:  # as an adapter over nn.Linear under autocast: everything in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            x, d, bias = _cast(dtype, x, d, bias)
            return diablo_linear(x, qt, d, bias)
    lead = x.shape[:-1]
    y = _DiaBloLinear.apply(x.reshape(-1, in_features), d, bias, qt)
    return y.view(*lead, out_features)

"""LoRA's math: the fused autograd function over a quantized weight, and LoftQ's initialization.

``lora_linear`` is one ``torch.autograd.Function`` with a hand-written backward. What it keeps for
backward, by construction: x once in its own dtype (only when A needs a gradient), the intermediate
``dropout(x) @ A^T`` (M x r), the dropout mask (bool, only when dropout > 0) and the packed weight.
Never a dequantized weight (backward decodes it again) nor an fp32 copy of x.
"""

from __future__ import annotations

import math
import numbers

import torch

from qft import ops
from qft.functional import _FLOATS, _autocast_dtype, _cast, _check_bias, _check_x, _without_autocast
from qft.ops import eager, lora_terms
from qft.tensor import QuantizedTensor, quantize


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, lora_A, lora_B, bias, qt, scaling, dropout):
        mask = None
        x_lora = x2d
        if dropout > 0:
            mask = torch.empty(x2d.shape, dtype=torch.bool, device=x2d.device).bernoulli_(1 - dropout)
            x_lora = x2d * mask / (1 - dropout)
        xa = lora_terms.adapter_input(x_lora, lora_A)
        y = eager.call(ops.quant_linear, x2d, *qt.op_args(), bias, xa, lora_B, scaling)
        needs_a = ctx.needs_input_grad[1]
        ctx.save_for_backward(x2d if needs_a else None, lora_A, lora_B, xa, mask)
        ctx.qt, ctx.scaling, ctx.dropout = qt, scaling, dropout
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):
        x2d, lora_A, lora_B, xa, mask = ctx.saved_tensors
        qt, scaling, dropout = ctx.qt, ctx.scaling, ctx.dropout
        needs_x, needs_a, needs_b, needs_bias = ctx.needs_input_grad[:4]
        x_lora = None
        if needs_a:
            x_lora = x2d if mask is None else x2d * mask / (1 - dropout)
        # grad_x, dA and dB from one op (one GEMM over K + r on a GPU)
        args = (x_lora, xa, lora_A, lora_B, scaling, mask, 1.0 / (1.0 - dropout), needs_x)
        grad_x, grad_a, grad_b = eager.call(ops.quant_lora_backward, grad, *qt.op_args(), *args)
        grad_x = grad_x if needs_x else None
        grad_a = grad_a if needs_a else None
        grad_b = grad_b if needs_b else None
        grad_bias = None
        if needs_bias:
            grad_bias = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None


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
        qt: frozen quantized weight ``[out, in]`` on x's device.
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


def lora_over(
    base, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout: float = 0.0, qt=None
) -> torch.Tensor:
    """``base(x) + scaling * dropout(x) @ A^T @ B^T`` as one ``lora_linear``, over a quantized base layer
    (``qft.nn.QuantLinear``); ``lora_A`` in the original feature order, also over an act-order layer.
    ``qt``: ``base.quantized`` when the caller has it already."""
    if base.input_perm is not None:  # x @ A^T == x[:, perm] @ A[:, perm]^T
        lora_A = lora_A.index_select(1, base.input_perm)
    qt = base.quantized if qt is None else qt
    return lora_linear(base.permute_input(x), qt, lora_A, lora_B, scaling, base.bias, dropout)


@torch.no_grad()
def loftq(
    weight: torch.Tensor, quant_config, lora_config, hessian: torch.Tensor | None = None
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023): ``(qt, A [r, in], B [out, r])`` with ``dequantize(qt) + scaling * B @ A``
    close to ``weight``. Each of ``lora_config.loftq_iters`` rounds quantizes ``W - scaling * B @ A`` with
    ``quant_config`` (a ``qft.QuantConfig``) and fits A, B to the quantization residual by a rank-r SVD,
    so the quantized base plus the initial adapter starts close to the full-precision weight. A and B
    come back in ``lora_config.adapter_dtype``. ``hessian``: the layer's calibration statistics, which
    method ``"gptq"`` quantizes under."""
    w = weight.detach().float()
    r, scaling = lora_config.r, lora_config.scaling
    c = quant_config
    correction = torch.zeros_like(w)
    for _ in range(lora_config.loftq_iters):
        target = (w - correction).to(weight.dtype)
        gptq_hessian = hessian if c.method == "gptq" else None
        qt = quantize(target, c.format, c.block_size, c.double_quant, c.method, gptq_hessian, c.act_order)
        residual = w - qt.dequantize(torch.float32)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:r].sqrt() / math.sqrt(scaling)
        b = u[:, :r] * root
        a = root.unsqueeze(1) * vh[:r]
        correction = scaling * (b @ a)
    return qt, a.to(lora_config.adapter_dtype), b.to(lora_config.adapter_dtype)

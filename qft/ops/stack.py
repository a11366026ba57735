"""Projections that read the same x (q/k/v, gate/up), each a LoRA layer over its own quantized weight,
run as one decode + GEMM each way on the GPU backends: the weights decoded into row blocks of one
scratch buffer with each B beside its own block (``gemm``'s K + r arrangement, r summed over the
members). The reference backend runs the members one by one (the same ops as unfused layers).
``qft.nn.fuse_projections`` is the opt-in model pass that routes layers here.
"""

from __future__ import annotations

import torch

from qft import formats
from qft.ops import gemm, scratch
from qft.ops.dispatch import backend_for, on_gpu_backend
from qft.ops.schema import BACKEND_MODULES, quant_linear, quant_lora_backward
from qft.ops.thresholds import fused_max_m


def fused(device: torch.device, m: int, k: int) -> bool:
    """Whether the members share one GEMM: a GPU backend, M above the fused small-M kernel's, and K that
    the strided decode takes; else they run one by one."""
    return on_gpu_backend(device) and m > fused_max_m(device) and gemm.beside(k)


def lora_forward(x, weights: list[formats.Weight], biases, xas, lora_Bs, scalings) -> torch.Tensor:
    """``[M, sum N_i]``: each member's ``x @ W_i^T + bias_i + s_i xa_i @ B_i^T`` side by side."""
    if not fused(x.device, *x.shape):
        ys = [
            quant_linear(x, *w.op_args(), b, xa, lb, s)
            for w, b, xa, lb, s in zip(weights, biases, xas, lora_Bs, scalings, strict=True)
        ]
        return torch.cat(ys, dim=1)
    decode = BACKEND_MODULES[backend_for(x.device)].dequantize
    return stack_forward(x, weights, biases, xas, lora_Bs, scalings, decode)


def lora_backward(grad, weights, x_loras, xas, lora_As, lora_Bs, scalings, masks, dropout_scale, need_x):
    """``(grad_x, [grad_A_i], [grad_B_i])`` for ``lora_forward``'s members (grad over ``[M, sum N_i]``)."""
    if not fused(grad.device, grad.shape[0], lora_As[0].shape[1]):
        grads_x, grads_a, grads_b, row = [], [], [], 0
        for w, xl, xa, a, b, s, mask in zip(weights, x_loras, xas, lora_As, lora_Bs, scalings, masks, strict=True):
            n = b.shape[0]
            own = grad[:, row : row + n].contiguous()
            gx, ga, gb = quant_lora_backward(own, *w.op_args(), xl, xa, a, b, s, mask, dropout_scale, need_x)
            grads_x.append(gx)
            grads_a.append(ga)
            grads_b.append(gb)
            row += n
        return (sum(grads_x[1:], grads_x[0]) if need_x else grads_x[0]), grads_a, grads_b
    decode = BACKEND_MODULES[backend_for(grad.device)].dequantize
    return stack_backward(grad, weights, x_loras, xas, lora_As, lora_Bs, scalings, masks, dropout_scale, need_x, decode)


def decoded_stack(weights, k: int, dtype: torch.dtype, decode, extras) -> torch.Tensor:
    """``[sum N_i, K + sum r_i]``: weight i decoded into its own row block, ``extras[i]`` [N_i, r_i] beside it
    in its own columns and zeros in the other members' (``gemm.beside(K)``); a view of the scratch buffer."""
    rows, ranks = [w.numel // k for w in weights], [e.shape[1] for e in extras]
    width = k + sum(ranks)
    stride = -(-width // gemm.ROW_ALIGN) * gemm.ROW_ALIGN
    buf = scratch.buffer(weights[0].device, dtype, sum(rows) * stride).view(sum(rows), stride)
    buf[:, k:width].zero_()
    row, col = 0, k
    for weight, n, extra in zip(weights, rows, extras, strict=True):
        decode(weight, dtype, buf[row : row + n, :k])
        buf[row : row + n, col : col + extra.shape[1]].copy_(extra)
        row, col = row + n, col + extra.shape[1]
    return buf[:, :width]


def stack_forward(x, weights, biases, xas, lora_Bs, scalings, decode) -> torch.Tensor:
    """Projections that read the same x, each ``x @ W_i^T + bias_i + s_i xa_i @ B_i^T``, as one GEMM over
    K + sum r_i: ``[x | s_1 xa_1 | ...] @ decoded_stack^T``; returns ``[M, sum N_i]`` (members side by side)."""
    m, k = x.shape
    w = decoded_stack(weights, k, x.dtype, decode, lora_Bs)
    x_cat = torch.empty((m, w.shape[1]), dtype=x.dtype, device=x.device)
    x_cat[:, :k] = x
    col = k
    for xa, scaling in zip(xas, scalings, strict=True):
        x_cat[:, col : col + xa.shape[1]] = scaling * xa
        col += xa.shape[1]
    y = x_cat @ w.t()
    if any(b is not None for b in biases):
        pairs = zip(weights, biases, strict=True)
        y += torch.cat([x.new_zeros(wt.numel // k) if b is None else b.to(x.dtype) for wt, b in pairs])
    return y


def stack_backward(grad, weights, x_loras, xas, lora_As, lora_Bs, scalings, masks, dropout_scale, need_x, decode):
    """The backward of ``stack_forward`` from one GEMM ``g @ decoded_stack = [g W | g_1 B_1 | ...]``:
    ``(grad_x, [grad_A_i], [grad_B_i])``, as ``lora_backward`` computes each (grad_x summed over members;
    an empty tensor when not ``need_x``; grad_A_i empty where ``x_loras[i]`` is None)."""
    k = lora_As[0].shape[1]
    w = decoded_stack(weights, k, grad.dtype, decode, lora_Bs)
    both = grad @ w
    grad_x = both[:, :k] if need_x else grad.new_empty(0)
    grads_a, grads_b = [], []
    row, col = 0, k
    for weight, x_lora, xa, a, b, s, mask in zip(weights, x_loras, xas, lora_As, lora_Bs, scalings, masks, strict=True):
        n, r = weight.numel // k, b.shape[1]
        grad_xa = s * both[:, col : col + r].to(a.dtype)
        if need_x:
            lora = grad_xa.to(grad.dtype) @ a.to(grad.dtype)
            if mask is not None:
                lora.mul_(mask).mul_(dropout_scale)
            grad_x += lora
        own = grad[:, row : row + n]
        grads_a.append((grad_xa.t().to(grad.dtype) @ x_lora).to(a.dtype) if x_lora is not None else a.new_empty(0))
        grads_b.append(s * (own.t() @ xa.to(grad.dtype)).to(b.dtype))
        row, col = row + n, col + r
    return grad_x, grads_a, grads_b

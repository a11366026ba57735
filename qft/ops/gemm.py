"""The large-M path of both GPU backends: decode the weight into a reused scratch buffer (never kept
across calls) and run one GEMM.

With LoRA, B sits beside the decoded W in the scratch rows, so each pass is one GEMM over K + r:
forward ``[x | s xa] @ [W | B]^T``, backward ``g @ [W | B] = [g W | g B]``. No M x N tensor is made
besides y and g, and nothing in fp32 larger than M x r: the LoRA terms ride the GEMM in x's dtype
(B and s xa rounded to it, products summed in fp32 by the GEMM).
"""

from __future__ import annotations

import torch

from qft import formats, reference
from qft.ops import scratch
from qft.ops.oft import oft_rotate


def decoded(weight: formats.Weight, rows: int, dtype: torch.dtype, decode) -> torch.Tensor:
    """``[rows, numel / rows]`` dense weight in ``dtype``: ``decode(weight, dtype, out)`` into scratch."""
    out = scratch.buffer(weight.device, dtype, weight.numel)
    return decode(weight, dtype, out).view(rows, -1)


# 16-byte aligned rows for the GEMM (8 bf16/fp16 values); the decode kernels need K % 32 == 0 to write
# rows of a wider buffer.
ROW_ALIGN, STRIDED_DECODE_MULTIPLE = 8, 32


def beside(k: int) -> bool:
    """Whether a weight with K input features can take the K + r GEMMs (else decode + addmm)."""
    return k % STRIDED_DECODE_MULTIPLE == 0


def decoded_beside(weight: formats.Weight, rows: int, dtype: torch.dtype, decode, extra: torch.Tensor) -> torch.Tensor:
    """``[rows, K + r]`` in ``dtype``: the decoded W in columns ``[0, K)`` and ``extra`` [rows, r] beside it,
    a view of the scratch buffer (rows padded to ``ROW_ALIGN`` values)."""
    k, r = weight.numel // rows, extra.shape[1]
    stride = -(-(k + r) // ROW_ALIGN) * ROW_ALIGN
    buf = scratch.buffer(weight.device, dtype, rows * stride).view(rows, stride)
    decode(weight, dtype, buf[:, :k])
    buf[:, k : k + r].copy_(extra)
    return buf[:, : k + r]


def lora_forward(x, weight, bias, lora_xa, lora_B, scaling: float, decode) -> torch.Tensor:
    """``x @ W^T + bias + scaling * lora_xa @ lora_B^T`` as one GEMM over K + r (``beside(K)``)."""
    m, k = x.shape
    w = decoded_beside(weight, weight.numel // k, x.dtype, decode, lora_B)
    x_cat = torch.empty((m, w.shape[1]), dtype=x.dtype, device=x.device)
    x_cat[:, :k] = x
    x_cat[:, k:] = scaling * lora_xa
    return x_cat @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x_cat, w.t())


def lora_backward(
    grad, weight, x_lora, xa, lora_A, lora_B, scaling: float, mask, dropout_scale: float, need_x: bool, decode
):
    """``(grad_x, grad_a, grad_b)`` from one GEMM ``g @ [W | B]`` (``beside(K)``): grad_xa = s g B (M x r),
    grad_x = g W + (grad_xa A) * mask * dropout_scale, grad_a = grad_xa^T x_lora, grad_b = s g^T xa;
    the LoRA products in g's dtype (summed in fp32), returned in the adapters' dtype; empty tensors for
    what is not asked (``need_x``; ``x_lora`` None)."""
    n = grad.shape[1]
    adapter = lora_A.dtype
    if need_x:
        w = decoded_beside(weight, n, grad.dtype, decode, lora_B)
        k = w.shape[1] - lora_B.shape[1]
        both = grad @ w  # [M, K + r]
        grad_x, grad_xa = both[:, :k], scaling * both[:, k:].to(adapter)
        lora = grad_xa.to(grad.dtype) @ lora_A.to(grad.dtype)
        if mask is not None:
            lora.mul_(mask).mul_(dropout_scale)  # in place: no M x K fp32 product of the mask
        grad_x += lora
    else:
        grad_x = grad.new_empty(0)
        grad_xa = scaling * (grad @ lora_B.to(grad.dtype)).to(adapter)
    grad_a = (grad_xa.t().to(grad.dtype) @ x_lora).to(adapter) if x_lora is not None else lora_A.new_empty(0)
    grad_b = scaling * (grad.t() @ xa.to(grad.dtype)).to(adapter)
    return grad_x, grad_a, grad_b


def lora_backward_any(grad, weight, x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x, decode):
    """``lora_backward`` where K allows the K + r GEMM; else the reference's arrangement with grad_x from
    decode + one GEMM (``linear_grad_input``)."""
    if beside(weight.numel // grad.shape[1]):
        args = (x_lora, xa, lora_A, lora_B, scaling, mask, dropout_scale, need_x)
        return lora_backward(grad, weight, *args, decode)

    def grad_input(grad_xa):
        w = decoded(weight, grad.shape[1], grad.dtype, decode)
        return linear_grad_input(grad, w, grad_xa, lora_A, mask, dropout_scale)

    return reference.lora_backward(grad, x_lora, xa, lora_A, lora_B, scaling, need_x, grad_input)


def rotates_weight(m: int, n: int) -> bool:
    """OFT at large M: rotate the decoded weight (N x K x b flops, a pass over the N x K scratch) rather
    than x (M x K x b, a pass over x) when M >= N."""
    return m >= n


def rotated_weight_linear(x, weight, bias, rot, decode) -> torch.Tensor:
    """OFT's ``(x R) @ W^T + bias`` as ``x @ (W R^T)^T + bias``: W decoded into scratch, its rows rotated
    per block by R^T (fp32, rounded to x's dtype as the x-side rounds x R), x untouched."""
    w = decoded(weight, weight.numel // x.shape[1], x.dtype, decode)
    return linear(x, oft_rotate(w, rot, True), bias, None, None, 0.0)


def add_blockdiag(w: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``w += blockdiag(D)`` in place for w [n * rows, n * cols] and D [n, rows, cols] (rounded to w's
    dtype): only the diagonal blocks are touched (N x K / n values). Returns w."""
    n, rows, cols = blocks.shape
    torch.diagonal(w.view(n, rows, n, cols), dim1=0, dim2=2).add_(blocks.permute(1, 2, 0).to(w.dtype))
    return w


def blockdiag_weight_linear(x, weight, bias, blocks, decode) -> torch.Tensor:
    """DiaBlo's ``x @ (W + blockdiag(D))^T + bias`` as one GEMM: D added to the decoded scratch weight's
    diagonal blocks (in x's dtype), so the update costs no pass over x or y."""
    w = decoded(weight, weight.numel // x.shape[1], x.dtype, decode)
    return linear(x, add_blockdiag(w, blocks), bias, None, None, 0.0)


def blockdiag_weight_grad_input(grad, weight, blocks, decode) -> torch.Tensor:
    """DiaBlo's ``grad @ (W + blockdiag(D))`` as one GEMM over the decoded scratch weight."""
    return grad @ add_blockdiag(decoded(weight, grad.shape[1], grad.dtype, decode), blocks)


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
        lora.mul_(dropout_mask).mul_(dropout_scale)
    return torch.addmm(lora.to(grad.dtype), grad, w)

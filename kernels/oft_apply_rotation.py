"""Triton kernels that apply OFT's block rotation R (built by ``oft_build_rotation``) to the input,
``x_rot[m, blk*b + c] = sum_k x[m, blk*b + k] * R[blk, k, c]`` in fp32 rounded back to x's dtype (the
math of ``qft.reference.oft_rotate``), and its backward: grad_x = g R^T and dL/dR = x^T g from one
read of x and g."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .decode import store_rounded

ROWS = 16


@triton.jit
def _rotate_kernel(
    x_ptr,  # [M, K]
    rot_ptr,  # [nb, b, b] fp32, already transposed when the caller rotates back
    out_ptr,  # [M, K] (int16 view when ROUND_BF16_BY_HAND)
    M,
    K,
    B: tl.constexpr,
    ROWS: tl.constexpr,
    USE_DOT: tl.constexpr,  # tl.dot needs b >= 16; smaller blocks multiply by broadcasting
    ROUND_BF16_BY_HAND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, B)
    row_ok = rows < M
    idx = rows[:, None].to(tl.int64) * K + blk * B + cols[None, :]
    x = tl.load(x_ptr + idx, mask=row_ok[:, None], other=0.0).to(tl.float32)
    r = tl.load(rot_ptr + blk * B * B + cols[:, None] * B + cols[None, :])
    if USE_DOT:
        out = tl.dot(x, r, input_precision="ieee")
    else:
        out = tl.sum(x[:, :, None] * r[None, :, :], axis=1)
    store_rounded(out_ptr, idx, out, row_ok[:, None], ROUND_BF16_BY_HAND)


def rotate(x: torch.Tensor, rot: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x`` [M, K] rotated block by block by ``rot`` [K / b, b, b] (``transpose``: by each R^T)."""
    m, k = x.shape
    nb, b, _ = rot.shape
    x = x.contiguous()
    r = (rot.transpose(-2, -1) if transpose else rot).float().contiguous()
    out = torch.empty_like(x)
    by_hand = x.dtype == torch.bfloat16 and interpreting()
    target = out.view(torch.int16) if by_hand else out
    grid = (triton.cdiv(m, ROWS), nb)
    _rotate_kernel[grid](x, r, target, m, k, B=b, ROWS=ROWS, USE_DOT=b >= 16, ROUND_BF16_BY_HAND=by_hand)
    return out


@triton.jit
def _rotate_backward_kernel(
    x_ptr,  # [M, K]
    grad_ptr,  # [M, K]: dL/d(x_rot)
    rot_t_ptr,  # [nb, b, b] fp32, R^T
    grad_x_ptr,  # [M, K] (int16 view when ROUND_BF16_BY_HAND)
    partial_ptr,  # [splits, nb, b, b] fp32: this split's share of dL/dR
    M,
    K,
    ROWS_PER_SPLIT,
    B: tl.constexpr,
    ROWS: tl.constexpr,
    USE_DOT: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
):
    blk = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, B)
    rot_t = tl.load(rot_t_ptr + blk * B * B + cols[:, None] * B + cols[None, :])
    acc = tl.zeros((B, B), dtype=tl.float32)
    begin = split * ROWS_PER_SPLIT
    end = tl.minimum(begin + ROWS_PER_SPLIT, M)
    for start in range(begin, end, ROWS):
        rows = start + tl.arange(0, ROWS)
        ok = (rows < end)[:, None]
        idx = rows[:, None].to(tl.int64) * K + blk * B + cols[None, :]
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        if USE_DOT:
            grad_x = tl.dot(g, rot_t, input_precision="ieee")
            acc += tl.dot(tl.trans(x), g, input_precision="ieee")
        else:
            grad_x = tl.sum(g[:, :, None] * rot_t[None, :, :], axis=1)
            acc += tl.sum(x[:, :, None] * g[:, None, :], axis=0)
        store_rounded(grad_x_ptr, idx, grad_x, ok, ROUND_BF16_BY_HAND)
    tl.store(partial_ptr + (split * tl.num_programs(0) + blk) * B * B + cols[:, None] * B + cols[None, :], acc)


def rotate_backward(x: torch.Tensor, grad: torch.Tensor, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x = g R^T in g's dtype, dL/dR = x^T g per block in fp32) for ``x_rot = rotate(x, rot)``.

    One program per (block, row split) reads its x and g tiles once; the splits' partial dL/dR are
    summed afterwards in a fixed order, so the result is deterministic.
    """
    m, k = x.shape
    nb, b, _ = rot.shape
    x, grad = x.contiguous(), grad.contiguous()
    rot_t = rot.transpose(-2, -1).float().contiguous()
    # Enough programs to fill a GPU (a few per SM) without making the partial sums large.
    splits = max(1, min(triton.cdiv(m, ROWS), 1024 // nb))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), ROWS) * ROWS
    splits = triton.cdiv(m, rows_per_split) if m else 1
    grad_x = torch.empty_like(grad)
    partial = torch.zeros(splits, nb, b, b, device=x.device, dtype=torch.float32)
    by_hand = grad.dtype == torch.bfloat16 and interpreting()
    target = grad_x.view(torch.int16) if by_hand else grad_x
    _rotate_backward_kernel[(nb, splits)](
        x,
        grad,
        rot_t,
        target,
        partial,
        m,
        k,
        rows_per_split,
        B=b,
        ROWS=ROWS,
        USE_DOT=b >= 16,
        ROUND_BF16_BY_HAND=by_hand,
    )
    return grad_x, partial.sum(0)

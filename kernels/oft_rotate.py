"""Triton block-diagonal rotation of the input for OFT: ``x_rot[m, blk*b + c] = sum_k x[m, blk*b + k] *
R[blk, k, c]`` in fp32, rounded back to x's dtype (the same math as ``qft.reference_oft.rotate``)."""

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
    _rotate_kernel[(triton.cdiv(m, ROWS), nb)](
        x, r, out.view(torch.int16) if by_hand else out, m, k, B=b, ROWS=ROWS, USE_DOT=b >= 16,
        ROUND_BF16_BY_HAND=by_hand,
    )  # fmt: skip
    return out

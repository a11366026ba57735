"""Triton per-block scale (and zero) search for the 3-/2-bit code books and affine int4/3/2.

The search is the costly part of low-bit quantization (13 candidate scales per code-book block, 21
candidate ranges per affine group, each a full encode + error); this kernel runs it with the same
fp32 steps as the reference (``qft.formats``) and fp64 error sums, so it picks the same scales. The cheap
elementwise rest (HQQ refinement, fp16 zero, codes, packing) stays in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from . import interpreting


@triton.jit
def _round_half_even(v):
    down = tl.floor(v)
    frac = v - down  # exact for the small values here
    odd = (down.to(tl.int32) & 1) == 1
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), down + 1.0, down)


@triton.jit
def _affine_from_range(lo, hi, MAX_CODE: tl.constexpr):
    scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, MAX_CODE, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    return scale, tl.math.div_rn(-lo, scale)


@triton.jit
def _search_kernel(
    w_ptr,  # [numel] fp32/fp16/bf16 (int16 bits of bf16 when WIDEN_BF16_BY_HAND)
    scale_ptr,  # [blocks] fp32 out
    zero_ptr,  # [blocks] fp32 out (AFFINE)
    factors_ptr,  # [N_FACTORS] fp32: SCALE_SEARCH (code books) or CLIP_GRID (affine)
    thresholds_ptr,  # code books: ascending thresholds
    table_ptr,  # code books: values
    numel,
    num_blocks,
    N_FACTORS: tl.constexpr,
    N_THRESHOLDS: tl.constexpr,
    AFFINE: tl.constexpr,
    SEARCH: tl.constexpr,  # affine: clip search (else min-max)
    MAX_CODE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    WIDEN_BF16_BY_HAND: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    idx = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    valid = idx < numel
    x = tl.load(w_ptr + idx, mask=valid, other=0)
    if WIDEN_BF16_BY_HAND:
        x = ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    row_ok = rows < num_blocks
    if AFFINE:
        lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
        hi = tl.max(tl.where(valid, x, -float("inf")), axis=1)
        best_scale, best_zero = _affine_from_range(lo, hi, MAX_CODE)
        if SEARCH:
            best_err = tl.full(lo.shape, float("inf"), tl.float64)
            for i in tl.static_range(N_FACTORS):
                f = tl.load(factors_ptr + i)
                s, z = _affine_from_range(lo * f, hi * f, MAX_CODE)
                v = tl.math.div_rn(x, s[:, None]) + z[:, None]
                q = tl.minimum(tl.maximum(_round_half_even(v), 0.0), MAX_CODE * 1.0)
                diff = ((q - z[:, None]) * s[:, None] - x).to(tl.float64)
                err = tl.sum(tl.where(valid, diff * diff, 0.0), axis=1)
                better = err < best_err
                best_err = tl.where(better, err, best_err)
                best_scale = tl.where(better, s, best_scale)
                best_zero = tl.where(better, z, best_zero)
        tl.store(zero_ptr + rows, best_zero, mask=row_ok)
    else:
        absmax = tl.maximum(tl.max(tl.abs(x), axis=1), tl.full((), 1e-38, tl.float32))  # fp32 on older Triton
        best_err = tl.full(absmax.shape, float("inf"), tl.float64)
        best_scale = absmax
        for i in tl.static_range(N_FACTORS):
            scale = absmax * tl.load(factors_ptr + i)
            s = tl.math.div_rn(x, scale[:, None])
            s = tl.minimum(tl.maximum(s, -1.0), 1.0)
            q = tl.zeros(s.shape, tl.int32)
            for t in tl.static_range(N_THRESHOLDS):
                q += (s > tl.load(thresholds_ptr + t)).to(tl.int32)
            diff = (tl.load(table_ptr + q) * scale[:, None] - x).to(tl.float64)
            err = tl.sum(diff * diff, axis=1)  # padding counts, as in the reference
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best_scale = tl.where(better, scale, best_scale)
    tl.store(scale_ptr + rows, best_scale, mask=row_ok)


def search_scales(w: torch.Tensor, fmt: str, block_size: int, method: str = "hqq"):
    """Per-block ``(scale fp32, zero fp32 or None)`` for ``w`` as the reference (``qft.formats``) chooses them:
    the searched code-book scale, or the affine min-max / clipped range (before HQQ refinement)."""
    spec = formats.get_format(fmt)
    w = w.contiguous()
    numel = w.numel()
    blocks = formats.num_blocks(numel, block_size)
    scale = torch.empty(blocks, dtype=torch.float32, device=w.device)
    zero = torch.empty(blocks, dtype=torch.float32, device=w.device) if spec.affine else scale
    grid_values = formats.affine.CLIP_GRID if spec.affine else formats.searched_codebooks.SCALE_SEARCH
    factors = torch.tensor(grid_values, dtype=torch.float32, device=w.device)
    thresholds = scale if spec.affine else formats.thresholds(fmt, w.device)
    table = scale if spec.affine else formats.code(fmt, w.device)
    by_hand = w.dtype == torch.bfloat16 and interpreting()
    rows = max(1, 1024 // block_size)
    _search_kernel[(triton.cdiv(blocks, rows),)](
        w.view(torch.int16) if by_hand else w,
        scale,
        zero,
        factors,
        thresholds,
        table,
        numel,
        blocks,
        N_FACTORS=len(grid_values),
        N_THRESHOLDS=0 if spec.affine else thresholds.numel(),
        AFFINE=spec.affine,
        SEARCH=method != "rtn",
        MAX_CODE=spec.max_code if spec.affine else 0,
        BLOCK_SIZE=block_size,
        ROWS=rows,
        WIDEN_BF16_BY_HAND=by_hand,
        enable_fp_fusion=False,
    )
    return scale, (zero if spec.affine else None)

"""Triton blockwise 4-bit dequantization (nf4/fp4, plain or double-quantized absmax).

Bit-identical to ``qft.formats.dequantize``: every product is a single fp32 rounding, fp fusion is off so
``code8 * absmax2 + offset`` is never contracted into an fma, and the output is rounded to
nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from . import interpreting
from .decode import load_scales, out_index, out_rows, store_rounded, weight_constants, weight_pointers

BYTES_PER_PROGRAM = 1024  # 2048 outputs per program


@triton.jit
def _dequantize_codebook4_kernel(
    W,  # the weight (decode.weight_pointers): bytes, absmax or its codes, double-quant state, code book
    out_ptr,  # [numel] fp32/fp16/bf16, or int16 when ROUND_BF16_BY_HAND
    numel,
    n_packed,
    row_length,  # decode.out_rows
    row_pad,
    FMT: tl.constexpr,  # decode.weight_constants
    ROUND_BF16_BY_HAND: tl.constexpr,  # the interpreter truncates fp32 -> bf16; round here instead
    STRIDED: tl.constexpr,
    BYTES: tl.constexpr,
):
    BLOCK_SIZE: tl.constexpr = FMT[2]
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BYTES + tl.arange(0, BYTES)
    in_range = j < n_packed
    byte = tl.load(W[0] + j, mask=in_range, other=0).to(tl.int32)
    block = (2 * j) // BLOCK_SIZE  # both nibbles of a byte share a block (BLOCK_SIZE is even)
    absmax = load_scales(W, block, in_range, FMT)
    high = tl.load(W[5] + (byte >> 4)) * absmax
    low = tl.load(W[5] + (byte & 0xF)) * absmax
    values = tl.interleave(high, low)
    index = 2 * pid * BYTES + tl.arange(0, 2 * BYTES)
    target = out_index(index, row_length, row_pad, STRIDED)
    store_rounded(out_ptr, target, values, index < numel, ROUND_BF16_BY_HAND)


def dequantize_codebook4(weight: formats.Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode an nf4/fp4 ``weight`` with Triton into ``out`` (flat, or ``[rows, K]`` rows of a wider
    buffer: ``decode.out_rows``) or a new flat ``dtype`` tensor; callers have checked the parts
    (``qft.formats.check_weight``)."""
    formats.get_bnb_format(weight.fmt)
    pointers = weight_pointers(weight)
    n_packed = pointers[0].numel()
    if out is None:
        out = torch.empty(weight.numel, dtype=dtype, device=weight.device)
    by_hand = dtype == torch.bfloat16 and interpreting()
    grid = (triton.cdiv(n_packed, BYTES_PER_PROGRAM),)
    _dequantize_codebook4_kernel[grid](
        pointers,
        out.view(torch.int16) if by_hand else out,
        weight.numel,
        n_packed,
        *out_rows(out)[:2],
        FMT=weight_constants(weight),
        ROUND_BF16_BY_HAND=by_hand,
        STRIDED=out_rows(out)[2],
        BYTES=BYTES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out

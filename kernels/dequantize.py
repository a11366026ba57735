"""Triton dequantization of 3-/2-bit code books and affine int4/3/2 (``qft.formats`` layouts).

Bit-identical to ``qft.formats.dequantize``: code-book values are ``code[q] * scale`` and affine ones
``(q - zero) * scale``, each one fp32 rounding, then rounded to nearest even in the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from . import interpreting
from .decode import decode_values, out_index, out_rows, store_rounded, weight_constants, weight_pointers

VALUES_PER_PROGRAM = 2048


@triton.jit
def _dequantize_kernel(
    W,  # the weight (decode.weight_pointers)
    out_ptr,
    numel,
    row_length,  # decode.out_rows
    row_pad,
    FMT: tl.constexpr,  # decode.weight_constants
    ROUND_BF16_BY_HAND: tl.constexpr,
    STRIDED: tl.constexpr,
    VALUES: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * VALUES + tl.arange(0, VALUES)
    ok = idx < numel
    values = decode_values(W, idx, ok, FMT)
    store_rounded(out_ptr, out_index(idx, row_length, row_pad, STRIDED), values, ok, ROUND_BF16_BY_HAND)


def dequantize(weight: formats.Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode every value of ``weight`` (any format) with Triton into ``out`` (flat, or ``[rows, K]`` rows
    of a wider buffer: ``decode.out_rows``) or a new flat ``dtype`` tensor; callers have checked the
    parts (``qft.formats.check_weight``)."""
    numel = weight.numel
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=weight.device)
    by_hand = dtype == torch.bfloat16 and interpreting()
    grid = (triton.cdiv(numel, VALUES_PER_PROGRAM),)
    _dequantize_kernel[grid](
        weight_pointers(weight),
        out.view(torch.int16) if by_hand else out,
        numel,
        *out_rows(out)[:2],
        FMT=weight_constants(weight),
        ROUND_BF16_BY_HAND=by_hand,
        STRIDED=out_rows(out)[2],
        VALUES=VALUES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out

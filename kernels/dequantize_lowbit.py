"""Triton dequantization of 3-/2-bit code books and affine int4/3/2 (``qft.formats`` layouts).

Bit-identical to ``qft.reference_lowbit``: code-book values are ``code[q] * scale`` and affine ones
``(q - zero) * scale``, each one fp32 rounding, then rounded to nearest even in the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from . import interpreting
from .decode import decode_values, store_rounded

VALUES_PER_PROGRAM = 2048


@triton.jit
def _dequantize_lowbit_kernel(
    packed_ptr,  # int32 words (3-, 2-bit) or uint8 bytes (4-bit)
    scale_ptr,  # [blocks] fp32, or uint8 codes when NESTED
    nested_absmax_ptr,
    offset_ptr,
    dynamic_map_ptr,
    code_ptr,  # [2**BITS] fp32 (code books)
    zero_ptr,  # [blocks] fp16 (AFFINE)
    out_ptr,
    numel,
    BITS: tl.constexpr,
    AFFINE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCK_SIZE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    VALUES: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * VALUES + tl.arange(0, VALUES)
    ok = idx < numel
    values = decode_values(packed_ptr, scale_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, code_ptr, zero_ptr,
                           idx, ok, BITS, AFFINE, BLOCK_SIZE, NESTED, NESTED_BLOCK_SIZE)  # fmt: skip
    store_rounded(out_ptr, idx, values, ok, ROUND_BF16_BY_HAND)


def dequantize_lowbit(
    packed, absmax, nested_absmax, offset, zero, block_size, fmt, numel, dtype, nested_block_size, out=None
) -> torch.Tensor:
    """Decode ``numel`` values with Triton into ``out`` (or a new flat ``dtype`` tensor).

    Arguments as ``qft.ops.dequantize_lowbit``; callers have checked them.
    """
    spec = formats.get_format(fmt)
    nested = nested_absmax is not None
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    by_hand = dtype == torch.bfloat16 and interpreting()
    table = absmax if spec.affine else formats.code(fmt, packed.device)
    grid = (triton.cdiv(numel, VALUES_PER_PROGRAM),)
    _dequantize_lowbit_kernel[grid](
        packed.contiguous(),
        absmax.contiguous(),
        nested_absmax.contiguous() if nested else absmax,
        offset if nested else absmax,
        formats.dynamic_map(packed.device),
        table,
        zero.contiguous() if spec.affine else absmax,
        out.view(torch.int16) if by_hand else out,
        numel,
        BITS=spec.bits,
        AFFINE=spec.affine,
        BLOCK_SIZE=block_size,
        NESTED=nested,
        NESTED_BLOCK_SIZE=nested_block_size,
        ROUND_BF16_BY_HAND=by_hand,
        VALUES=VALUES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out

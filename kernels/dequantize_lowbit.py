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
    if BITS == 4:
        byte = tl.load(packed_ptr + idx // 2, mask=ok, other=0).to(tl.int32)
        q = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    elif BITS == 2:
        word = tl.load(packed_ptr + idx // 16, mask=ok, other=0)
        q = (word >> (2 * (idx % 16)).to(tl.int32)) & 3
    else:  # 3-bit planar: words (low 0-15, low 16-31, high) per 32 values
        base = (idx // 32) * 3
        lane = idx % 32
        low_word = tl.load(packed_ptr + base + lane // 16, mask=ok, other=0)
        high_word = tl.load(packed_ptr + base + 2, mask=ok, other=0)
        low = (low_word >> (2 * (lane % 16)).to(tl.int32)) & 3
        q = low | (((high_word >> lane.to(tl.int32)) & 1) << 2)
    block = idx // BLOCK_SIZE
    if NESTED:
        q8 = tl.load(scale_ptr + block, mask=ok, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCK_SIZE, mask=ok, other=0.0)
        scale = tl.load(dynamic_map_ptr + q8) * scale2 + tl.load(offset_ptr)
    else:
        scale = tl.load(scale_ptr + block, mask=ok, other=0.0)
    if AFFINE:
        zero = tl.load(zero_ptr + block, mask=ok, other=0.0).to(tl.float32)
        values = (q.to(tl.float32) - zero) * scale
    else:
        values = tl.load(code_ptr + q) * scale
    if ROUND_BF16_BY_HAND:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + idx, (bits >> 16).to(tl.int16), mask=ok)
    else:
        tl.store(out_ptr + idx, values.to(out_ptr.dtype.element_ty), mask=ok)


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

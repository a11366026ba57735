"""Triton blockwise 4-bit dequantization (nf4/fp4, plain or double-quantized absmax).

Bit-identical to ``qft.reference.dequantize_4bit`` (after ``reference.dequantize_nested`` when the
absmax is double-quantized): every product is a single fp32 rounding, fp fusion is off so
``code8 * absmax2 + offset`` is never contracted into an fma, and the output is rounded to
nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from . import interpreting
from .decode import load_scales, store_rounded

BYTES_PER_PROGRAM = 1024  # 2048 outputs per program


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,  # [n_packed] uint8
    absmax_ptr,  # [num_blocks] fp32, or uint8 codes when NESTED
    nested_absmax_ptr,  # [num_blocks / NESTED_BLOCK_SIZE] fp32 (NESTED only)
    offset_ptr,  # [] fp32 (NESTED only)
    dynamic_map_ptr,  # [256] fp32 (NESTED only)
    code_ptr,  # [16] fp32 code book
    out_ptr,  # [numel] fp32/fp16/bf16, or int16 when ROUND_BF16_BY_HAND
    numel,
    n_packed,
    BLOCK_SIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCK_SIZE: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,  # the interpreter truncates fp32 -> bf16; round here instead
    BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BYTES + tl.arange(0, BYTES)
    in_range = j < n_packed
    byte = tl.load(packed_ptr + j, mask=in_range, other=0).to(tl.int32)
    block = (2 * j) // BLOCK_SIZE  # both nibbles of a byte share a block (BLOCK_SIZE is even)
    absmax = load_scales(absmax_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block, in_range, NESTED,
                         NESTED_BLOCK_SIZE)  # fmt: skip
    high = tl.load(code_ptr + (byte >> 4)) * absmax
    low = tl.load(code_ptr + (byte & 0xF)) * absmax
    values = tl.interleave(high, low)
    index = 2 * pid * BYTES + tl.arange(0, 2 * BYTES)
    store_rounded(out_ptr, index, values, index < numel, ROUND_BF16_BY_HAND)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int,
    fmt: str,
    numel: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_block_size: int = formats.NESTED_BLOCK_SIZE,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``numel`` 4-bit values with Triton; returns a flat ``dtype`` tensor.

    ``absmax`` is fp32 per block, or uint8 codes of the dynamic map when ``nested_absmax`` (fp32 per
    ``nested_block_size`` blocks) and ``offset`` (fp32 scalar) are given. All inputs on one device.
    ``out``, if given, is a contiguous ``[numel]`` tensor of ``dtype`` to decode into (a scratch buffer).
    """
    formats.get_4bit_format(fmt)
    formats.check_block_size(block_size)
    nested = nested_absmax is not None
    packed, absmax = packed.contiguous(), absmax.contiguous()
    if nested:
        nested_absmax = nested_absmax.contiguous()
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    by_hand = dtype == torch.bfloat16 and interpreting()
    grid = (triton.cdiv(packed.numel(), BYTES_PER_PROGRAM),)
    _dequantize_4bit_kernel[grid](
        packed,
        absmax,
        nested_absmax if nested else absmax,
        offset if nested else absmax,
        formats.dynamic_map(packed.device),
        formats.code(fmt, packed.device),
        out.view(torch.int16) if by_hand else out,
        numel,
        packed.numel(),
        BLOCK_SIZE=block_size,
        NESTED=nested,
        NESTED_BLOCK_SIZE=nested_block_size,
        ROUND_BF16_BY_HAND=by_hand,
        BYTES=BYTES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out

"""Triton helpers shared by the decoding kernels: codes and scales at flat weight positions."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(packed_ptr, idx, ok, BITS: tl.constexpr):
    """The codes at flat positions ``idx`` (``qft.formats`` layouts: 4-bit bytes, 3-bit planar
    int32 words, 2-bit int32 words), as int32."""
    if BITS == 4:
        byte = tl.load(packed_ptr + idx // 2, mask=ok, other=0).to(tl.int32)
        q = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    elif BITS == 2:
        word = tl.load(packed_ptr + idx // 16, mask=ok, other=0)
        q = (word >> (2 * (idx % 16)).to(tl.int32)) & 3
    else:  # 3-bit planar: words (low bits of 0-15, low bits of 16-31, high bits) per 32 values
        base = (idx // 32) * 3
        lane = idx % 32
        low_word = tl.load(packed_ptr + base + lane // 16, mask=ok, other=0)
        high_word = tl.load(packed_ptr + base + 2, mask=ok, other=0)
        low = (low_word >> (2 * (lane % 16)).to(tl.int32)) & 3
        q = low | (((high_word >> lane.to(tl.int32)) & 1) << 2)
    return q


@triton.jit
def load_scales(scale_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block, ok,
                NESTED: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """The fp32 scale of each block: stored, or ``map[q8] * absmax2 + offset`` (two roundings: the
    caller launches with fp fusion off)."""
    if NESTED:
        q8 = tl.load(scale_ptr + block, mask=ok, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCK_SIZE, mask=ok, other=0.0)
        scale = tl.load(dynamic_map_ptr + q8) * scale2 + tl.load(offset_ptr)
    else:
        scale = tl.load(scale_ptr + block, mask=ok, other=0.0)
    return scale


@triton.jit
def decode_values(packed_ptr, scale_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, code_ptr, zero_ptr, idx, ok,
                  BITS: tl.constexpr, AFFINE: tl.constexpr, BLOCK_SIZE: tl.constexpr, NESTED: tl.constexpr,
                  NESTED_BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """fp32 weight values at flat positions ``idx``: ``code[q] * scale`` or ``(q - zero) * scale``."""
    q = load_codes(packed_ptr, idx, ok, BITS)
    block = idx // BLOCK_SIZE
    scale = load_scales(scale_ptr, nested_absmax_ptr, offset_ptr, dynamic_map_ptr, block, ok, NESTED,
                        NESTED_BLOCK_SIZE)  # fmt: skip
    if AFFINE:
        zero = tl.load(zero_ptr + block, mask=ok, other=0.0).to(tl.float32)
        values = (q.to(tl.float32) - zero) * scale
    else:
        values = tl.load(code_ptr + q) * scale
    return values


@triton.jit
def store_rounded(out_ptr, idx, values, ok, ROUND_BF16_BY_HAND: tl.constexpr):
    """Store fp32 ``values`` rounded to nearest even in the output dtype. The interpreter truncates
    fp32 -> bf16, so there ``out_ptr`` is an int16 view and the rounding is done on the bits."""
    if ROUND_BF16_BY_HAND:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + idx, (bits >> 16).to(tl.int16), mask=ok)
    else:
        tl.store(out_ptr + idx, values.to(out_ptr.dtype.element_ty), mask=ok)

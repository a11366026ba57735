"""Triton helpers shared by the decoding kernels: codes and scales at flat weight positions, and the
weight's pointers and constants in the one order every decoding kernel takes them."""

from __future__ import annotations

import triton
import triton.language as tl

from qft import formats


def weight_pointers(weight: formats.Weight) -> tuple:
    """The weight as one kernel argument ``W``: ``(codes, scales, nested_scales, offset, dynamic_map,
    code, zeros)``. An absent part passes ``scales`` (never read: ``weight_constants`` switches its
    loads off). Parts are made contiguous here."""
    fmt = formats.get_format(weight.fmt)
    scales = weight.scales.contiguous()
    nested = weight.nested_scales.contiguous() if weight.double_quant else scales
    offset = weight.offset if weight.double_quant else scales
    code = scales if fmt.affine else formats.code(weight.fmt, scales.device)
    zeros = weight.zeros.contiguous() if fmt.affine else scales
    dmap = formats.dynamic_map(scales.device)
    return weight.codes.contiguous(), scales, nested, offset, dmap, code, zeros


def weight_constants(weight: formats.Weight) -> tuple:
    """The constexpr ``FMT`` that specializes the decode to the weight's format: ``(bits, affine,
    block_size, double-quantized, nested_block_size)``."""
    fmt = formats.get_format(weight.fmt)
    return fmt.bits, fmt.affine, weight.block_size, weight.double_quant, weight.nested_block_size


@triton.jit
def load_codes(codes_ptr, idx, ok, BITS: tl.constexpr):
    """The codes at flat positions ``idx`` (``qft.formats`` layouts: 4-bit bytes, 3-bit planar
    int32 words, 2-bit int32 words), as int32."""
    if BITS == 4:
        byte = tl.load(codes_ptr + idx // 2, mask=ok, other=0).to(tl.int32)
        q = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    elif BITS == 2:
        word = tl.load(codes_ptr + idx // 16, mask=ok, other=0)
        q = (word >> (2 * (idx % 16)).to(tl.int32)) & 3
    else:  # 3-bit planar: words (low bits of 0-15, low bits of 16-31, high bits) per 32 values
        base = (idx // 32) * 3
        lane = idx % 32
        low_word = tl.load(codes_ptr + base + lane // 16, mask=ok, other=0)
        high_word = tl.load(codes_ptr + base + 2, mask=ok, other=0)
        low = (low_word >> (2 * (lane % 16)).to(tl.int32)) & 3
        q = low | (((high_word >> lane.to(tl.int32)) & 1) << 2)
    return q


@triton.jit
def load_scales(W, block, ok, FMT: tl.constexpr):
    """The fp32 scale of each block: stored, or ``map[q8] * nested_scale + offset`` (two roundings: the
    caller launches with fp fusion off)."""
    NESTED: tl.constexpr = FMT[3]
    NESTED_BLOCK_SIZE: tl.constexpr = FMT[4]
    if NESTED:
        q8 = tl.load(W[1] + block, mask=ok, other=0).to(tl.int32)
        nested = tl.load(W[2] + block // NESTED_BLOCK_SIZE, mask=ok, other=0.0)
        scale = tl.load(W[4] + q8) * nested + tl.load(W[3])
    else:
        scale = tl.load(W[1] + block, mask=ok, other=0.0)
    return scale


@triton.jit
def decode_values(W, idx, ok, FMT: tl.constexpr):
    """fp32 weight values at flat positions ``idx``: ``code[q] * scale`` or ``(q - zero) * scale``."""
    BITS: tl.constexpr = FMT[0]
    AFFINE: tl.constexpr = FMT[1]
    BLOCK_SIZE: tl.constexpr = FMT[2]
    q = load_codes(W[0], idx, ok, BITS)
    block = idx // BLOCK_SIZE
    scale = load_scales(W, block, ok, FMT)
    if AFFINE:
        zero = tl.load(W[6] + block, mask=ok, other=0.0).to(tl.float32)
        values = (q.to(tl.float32) - zero) * scale
    else:
        values = tl.load(W[5] + q) * scale
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

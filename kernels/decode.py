"""Triton helpers shared by the decoding kernels: codes and scales at flat weight positions, and the
weight's pointers and constants in the one order every decoding kernel takes them."""

from __future__ import annotations

import torch
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
    zeros = weight.zeros.contiguous() if fmt.stores_zeros else scales
    dmap = formats.dynamic_map(scales.device)
    return weight.codes.contiguous(), scales, nested, offset, dmap, code, zeros


def weight_constants(weight: formats.Weight) -> tuple:
    """The constexpr ``FMT`` that specializes the decode to the weight's format: ``(bits, affine,
    block_size, double-quantized, nested_block_size, zeros)`` (zeros: a zero per block, subtracted
    from the level, q or ``code[q]``, before scaling)."""
    fmt = formats.get_format(weight.fmt)
    return fmt.bits, fmt.affine, weight.block_size, weight.double_quant, weight.nested_block_size, fmt.stores_zeros


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
def level_values(W, q, zero, scale, FMT: tl.constexpr):
    """fp32 values of codes ``q``: ``(level - zero) * scale`` with level q (affine) or ``code[q]``;
    ``code[q] * scale`` when the format stores no zeros (one rounding per step)."""
    AFFINE: tl.constexpr = FMT[1]
    ZEROS: tl.constexpr = FMT[5]
    if AFFINE:
        values = (q.to(tl.float32) - zero) * scale
    elif ZEROS:
        values = (tl.load(W[5] + q) - zero) * scale
    else:
        values = tl.load(W[5] + q) * scale
    return values


@triton.jit
def decode_values(W, idx, ok, FMT: tl.constexpr):
    """fp32 weight values at flat positions ``idx``: ``code[q] * scale`` or ``(level - zero) * scale``."""
    BITS: tl.constexpr = FMT[0]
    BLOCK_SIZE: tl.constexpr = FMT[2]
    ZEROS: tl.constexpr = FMT[5]
    q = load_codes(W[0], idx, ok, BITS)
    block = idx // BLOCK_SIZE
    scale = load_scales(W, block, ok, FMT)
    zero = tl.load(W[6] + block, mask=ok, other=0.0).to(tl.float32) if ZEROS else 0.0
    return level_values(W, q, zero, scale, FMT)


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


def out_rows(out: torch.Tensor) -> tuple[int, int, bool]:
    """``(row_length, row_pad, STRIDED)`` for a decode into ``out``: flat, or ``[rows, K]`` with unit
    column stride and rows ``K + row_pad`` apart (other columns of a wider buffer beside W)."""
    if out.dim() == 2 and out.stride(0) != out.shape[1]:
        return out.shape[1], out.stride(0) - out.shape[1], True
    return 1, 0, False


@triton.jit
def out_index(idx, row_length, row_pad, STRIDED: tl.constexpr):
    """Where decoded value ``idx`` goes (``out_rows``)."""
    if STRIDED:
        return idx + (idx // row_length) * row_pad
    return idx


@triton.jit
def tile_scales(W, rows, k0, K, row_ok, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 scales (and zeros; 0.0 where the format stores none) of a ``[BLOCK_N, BLOCK_K]`` tile of a
    weight whose blocks stay inside rows: one load per block, broadcast over its values."""
    ZEROS: tl.constexpr = FMT[5]
    BLOCK_SIZE: tl.constexpr = FMT[2]
    blocks_per_row = K // BLOCK_SIZE
    if BLOCK_SIZE >= BLOCK_K:  # the tile lies in one block per row
        block = rows.to(tl.int64) * blocks_per_row + k0 // BLOCK_SIZE
        scale = load_scales(W, block, row_ok, FMT)[:, None]
        zero = tl.load(W[6] + block, mask=row_ok, other=0.0).to(tl.float32)[:, None] if ZEROS else 0.0
        scale = tl.broadcast_to(scale, (BLOCK_N, BLOCK_K))
        zero = tl.broadcast_to(zero, (BLOCK_N, BLOCK_K)) if ZEROS else zero
    else:
        PER: tl.constexpr = BLOCK_K // BLOCK_SIZE
        local = k0 // BLOCK_SIZE + tl.arange(0, PER)
        ok = row_ok[:, None] & (local < blocks_per_row)[None, :]
        block = rows.to(tl.int64)[:, None] * blocks_per_row + local[None, :]
        scale = load_scales(W, block, ok, FMT)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, PER, BLOCK_SIZE)), (BLOCK_N, BLOCK_K))
        if ZEROS:
            zero = tl.load(W[6] + block, mask=ok, other=0.0).to(tl.float32)
            zero = tl.reshape(tl.broadcast_to(zero[:, :, None], (BLOCK_N, PER, BLOCK_SIZE)), (BLOCK_N, BLOCK_K))
        else:
            zero = 0.0
    return scale, zero


@triton.jit
def tile_codes(W, rows, k0, K, row_ok, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes of a ``[BLOCK_N, BLOCK_K]`` tile (K a multiple of the packing unit, BLOCK_K of 32):
    every packed byte or word loaded once and split in registers."""
    BITS: tl.constexpr = FMT[0]
    if BITS == 4:  # two codes per byte, high nibble first
        HALF: tl.constexpr = BLOCK_K // 2
        j = k0 // 2 + tl.arange(0, HALF)
        ok = row_ok[:, None] & (j < K // 2)[None, :]
        byte = tl.load(W[0] + rows.to(tl.int64)[:, None] * (K // 2) + j[None, :], mask=ok, other=0).to(tl.int32)
        q = tl.interleave(byte >> 4, byte & 0xF)
    elif BITS == 2:  # sixteen codes per word
        WORDS: tl.constexpr = BLOCK_K // 16
        j = k0 // 16 + tl.arange(0, WORDS)
        ok = row_ok[:, None] & (j < K // 16)[None, :]
        word = tl.load(W[0] + rows.to(tl.int64)[:, None] * (K // 16) + j[None, :], mask=ok, other=0)
        shift = 2 * tl.arange(0, 16)
        q = tl.reshape((word[:, :, None] >> shift[None, None, :]) & 3, (BLOCK_N, BLOCK_K))
    else:  # 3-bit planar: per 32 codes, low bits of 0-15 and 16-31, then the high bits
        UNITS: tl.constexpr = BLOCK_K // 32
        u = k0 // 32 + tl.arange(0, UNITS)
        ok = row_ok[:, None] & (u < K // 32)[None, :]
        base = W[0] + (rows.to(tl.int64)[:, None] * (K // 32) + u[None, :]) * 3
        low0 = tl.load(base, mask=ok, other=0)[:, :, None]
        low1 = tl.load(base + 1, mask=ok, other=0)[:, :, None]
        high = tl.load(base + 2, mask=ok, other=0)[:, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        low = (tl.where(lane < 16, low0, low1) >> (2 * (lane % 16))) & 3
        q = tl.reshape(low | (((high >> lane) & 1) << 2), (BLOCK_N, BLOCK_K))
    return q


@triton.jit
def decode_tile(W, rows, k0, K, row_ok, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_K]`` values of weight rows ``rows``, columns ``k0 + [0, BLOCK_K)``, for a
    weight whose blocks stay inside rows (K % BLOCK_SIZE == 0): the same arithmetic as
    ``decode_values``, with each scale, zero and packed unit read once per tile."""
    q = tile_codes(W, rows, k0, K, row_ok, FMT, BLOCK_N, BLOCK_K)
    scale, zero = tile_scales(W, rows, k0, K, row_ok, FMT, BLOCK_N, BLOCK_K)
    return level_values(W, q, zero, scale, FMT)

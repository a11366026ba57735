"""Triton blockwise 4-bit quantization (nf4/fp4), bit-identical to ``qft.reference.quantize_codebook4``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qft import formats

from . import interpreting


@triton.jit
def _quantize_codebook4_kernel(
    w_ptr,  # [numel] fp32/fp16/bf16, contiguous
    packed_ptr,  # [(numel + 1) // 2] uint8 out
    absmax_ptr,  # [num_blocks] fp32 out
    thresholds_ptr,  # [15] fp32, ascending
    order_ptr,  # [16] int32, threshold position -> nibble
    numel,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    IDENTITY_ORDER: tl.constexpr,  # nf4: position == nibble, skip the gather
    WIDEN_BF16_BY_HAND: tl.constexpr,  # w holds bf16 bits as int16 (the interpreter flushes subnormals)
):
    pid = tl.program_id(0)
    blocks = pid.to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    pair = tl.arange(0, BLOCK_SIZE // 2)
    # Even and odd elements load separately so each byte's two nibbles sit in the same lane.
    even = blocks[:, None] * BLOCK_SIZE + 2 * pair[None, :]
    x_even = tl.load(w_ptr + even, mask=even < numel, other=0)
    x_odd = tl.load(w_ptr + even + 1, mask=even + 1 < numel, other=0)
    if WIDEN_BF16_BY_HAND:
        x_even = ((x_even.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        x_odd = ((x_odd.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x_even = x_even.to(tl.float32)
        x_odd = x_odd.to(tl.float32)

    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    tl.store(absmax_ptr + blocks, absmax, mask=blocks * BLOCK_SIZE < numel)

    # An fp32 floor: Triton < 3.7 reads a float literal below fp32's normal range as fp64.
    floored = tl.maximum(absmax, tl.full((), 1e-38, tl.float32))[:, None]
    reciprocal = tl.math.div_rn(tl.full(floored.shape, 1.0, tl.float32), floored)
    s_even = x_even * reciprocal
    s_odd = x_odd * reciprocal
    if (pid.to(tl.int64) + 1) * BLOCKS_PER_PROGRAM * BLOCK_SIZE > numel:
        # The partial tail block divides instead of multiplying by the reciprocal (bitsandbytes).
        partial = ((blocks + 1) * BLOCK_SIZE > numel)[:, None]
        s_even = tl.where(partial, tl.math.div_rn(x_even, floored), s_even)
        s_odd = tl.where(partial, tl.math.div_rn(x_odd, floored), s_odd)
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)

    # Code = number of thresholds strictly below s (a tie takes the lower code).
    pos_even = tl.zeros(s_even.shape, tl.int32)
    pos_odd = tl.zeros(s_odd.shape, tl.int32)
    for i in tl.static_range(15):
        t = tl.load(thresholds_ptr + i)
        pos_even += (s_even > t).to(tl.int32)
        pos_odd += (s_odd > t).to(tl.int32)
    if not IDENTITY_ORDER:
        pos_even = tl.load(order_ptr + pos_even)
        pos_odd = tl.load(order_ptr + pos_odd)

    byte = ((pos_even << 4) | pos_odd).to(tl.uint8)
    byte_index = blocks[:, None] * (BLOCK_SIZE // 2) + pair[None, :]
    tl.store(packed_ptr + byte_index, byte, mask=even < numel)


def _blocks_per_program(block_size: int) -> int:
    # About 2048 values per program: enough work per program, few programs under the interpreter.
    return max(1, 2048 // block_size)


def quantize_codebook4(w: torch.Tensor, block_size: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` blockwise to 4 bits with Triton.

    Args:
        w: fp32/fp16/bf16 tensor of any shape, finite (callers validate); made contiguous here.
        block_size: one of ``formats.BLOCK_SIZES``.
        fmt: ``"nf4"`` or ``"fp4"``.

    Returns:
        ``(packed uint8 [(n + 1) // 2], absmax fp32 [num_blocks])`` on ``w``'s device.
    """
    spec = formats.get_bnb_format(fmt)
    formats.check_block_size(block_size)
    w = w.contiguous()
    numel = w.numel()
    blocks = formats.num_blocks(numel, block_size)
    packed = torch.empty(formats.packed_numel(numel), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    per_program = _blocks_per_program(block_size)
    grid = (triton.cdiv(blocks, per_program),)
    by_hand = w.dtype == torch.bfloat16 and interpreting()
    _quantize_codebook4_kernel[grid](
        w.view(torch.int16) if by_hand else w,
        packed,
        absmax,
        formats.thresholds(fmt, w.device),
        formats.encode_order(fmt, w.device),
        numel,
        BLOCK_SIZE=block_size,
        BLOCKS_PER_PROGRAM=per_program,
        IDENTITY_ORDER=spec.encode_order == tuple(range(16)),
        WIDEN_BF16_BY_HAND=by_hand,
    )
    return packed, absmax

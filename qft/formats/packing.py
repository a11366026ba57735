"""How codes are laid out in the stored ``codes`` part: one rule per bit width, written once here.

Codes run along the row-major flattened weight.

* 4-bit: two codes per byte, value ``2j`` in the high nibble of byte ``j``, ``2j+1`` in the low one
  (bitsandbytes' layout); ``(n + 1) // 2`` bytes.
* 3-bit, bit-planar: per 32 values three int32 words; word 0 holds the low 2 bits of values 0..15
  (value i at bits 2i, 2i+1), word 1 those of values 16..31, word 2 the high bit of value i at bit
  i (exactly 3.0 bits, no value straddles a word).
* 2-bit: sixteen values per int32 word, value i at bits 2i, 2i+1.

A partial last byte or group of words is padded with the format's ``zero_code``.
"""

from __future__ import annotations

import torch

# Values per packing unit and stored elements per unit, by bit width.
UNITS = {4: (2, 1), 3: (32, 3), 2: (16, 1)}


def check_bits(bits: int) -> int:
    """``bits`` if qft packs codes of that width (4, 3, 2); ``ValueError`` otherwise."""
    if bits not in UNITS:
        raise ValueError(f"no packing for {bits}-bit codes (4, 3, 2)")
    return bits


def packed_numel(numel: int, bits: int = 4) -> int:
    """Elements of the packed tensor for ``numel`` codes: bytes (4-bit) or int32 words (3-, 2-bit)."""
    values, elements = UNITS[check_bits(bits)]
    return elements * -(-numel // values)


def packed_dtype(bits: int) -> torch.dtype:
    """uint8 for 4-bit (bitsandbytes' layout), int32 words for 3- and 2-bit."""
    return torch.uint8 if check_bits(bits) == 4 else torch.int32


def pack(codes: torch.Tensor, bits: int, zero_code: int = 0) -> torch.Tensor:
    """Pack flat codes (< 2**bits, any integer dtype) into the stored layout of ``bits``."""
    values, _ = UNITS[check_bits(bits)]
    pad = -codes.numel() % values
    c = torch.nn.functional.pad(codes.reshape(-1).to(torch.int64), (0, pad), value=zero_code).view(-1, values)
    if bits == 4:
        return ((c[:, 0] << 4) | c[:, 1]).to(torch.uint8)
    shifts = 2 * torch.arange(16, device=codes.device)
    if bits == 2:
        return _to_int32(((c & 3) << shifts).sum(1))
    low = c & 3
    word0 = (low[:, :16] << shifts).sum(1)
    word1 = (low[:, 16:] << shifts).sum(1)
    word2 = ((c >> 2) << torch.arange(32, device=codes.device)).sum(1)
    return _to_int32(torch.stack([word0, word1, word2], 1).reshape(-1))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # int64 sums below 2**32 -> the same bit pattern as int32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``numel`` codes as int64."""
    if check_bits(bits) == 4:
        return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel].long()
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = 2 * torch.arange(16, device=packed.device)
    if bits == 2:
        return ((words.unsqueeze(1) >> shifts) & 3).reshape(-1)[:numel]
    w = words.view(-1, 3)
    low = torch.cat([(w[:, :1] >> shifts) & 3, (w[:, 1:2] >> shifts) & 3], 1)
    high = (w[:, 2:] >> torch.arange(32, device=packed.device)) & 1
    return (low | (high << 2)).reshape(-1)[:numel]


def blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """View a flat tensor as ``[blocks, block_size]``, zero-padding the tail block."""
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def blocks_with_mask(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [blocks, block_size] fp32 of the flattened w, zero-padded; mask of the real values)``: a
    range or offset search must not count the padding."""
    n = w.numel()
    x = blocks(w.reshape(-1).float(), block_size)
    return x, blocks(torch.ones(n, device=w.device), block_size) > 0


def num_blocks(numel: int, block_size: int) -> int:
    """Number of (possibly partial) blocks covering ``numel`` values."""
    return -(-numel // block_size)

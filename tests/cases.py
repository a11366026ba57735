"""Weights that exercise the edges of blockwise quantization, and the reference over separate parts."""

from __future__ import annotations

import torch

from qft import formats

# Odd counts, counts not a multiple of any block, single rows, 1-D, exact multiples.
SHAPES = [(3, 77), (1, 4099), (17, 64), (5,), (2, 2048), (1, 1), (129, 33)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def edge_weight(shape, dtype, block_size: int) -> torch.Tensor:
    """Normal weights with an all-zero first block, a block of subnormals (of ``dtype``) next, and
    one huge value in the last block."""
    w = torch.randn(shape) * 3
    flat = w.view(-1)
    if flat.numel() > block_size:
        flat[:block_size] = 0
    if flat.numel() > 3 * block_size:
        flat[block_size : 2 * block_size] = torch.randn(block_size) * torch.finfo(dtype).tiny / 8
    flat[-1] = 1e3 if dtype == torch.float16 else 1e4
    return w.to(dtype)


def weight(codes, scales, block_size: int, fmt: str, numel: int, nested=None, offset=None) -> formats.Weight:
    """A ``qft.formats.Weight`` from separate parts (``nested``/``offset``: double-quantized scales)."""
    parts = {"codes": codes, "scales": scales}
    if nested is not None:
        parts.update(nested_scales=nested, offset=offset)
    return formats.Weight(parts, fmt, numel, block_size)


def ref_quantize(w: torch.Tensor, block_size: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference encode of a code-book format: ``(codes, fp32 scales)``."""
    encoded = formats.quantize(w, fmt, block_size)
    return encoded.codes, encoded.scales


def ref_dequantize(codes, scales, block_size: int, fmt: str, numel: int, dtype, nested=None, offset=None):
    """The reference decode of separate parts (flat ``dtype``)."""
    return formats.dequantize(weight(codes, scales, block_size, fmt, numel, nested, offset), dtype)

"""The common landing of outside affine layouts (HQQ, GPTQ) in qft's int4/3/2 formats."""

from __future__ import annotations

import torch

from qft import formats
from qft.tensor import QuantizedTensor, check_finite_scales


def affine_format(bits: int, group_size: int) -> str:
    """The qft format of ``bits``-bit affine codes in groups of ``group_size``; ``ValueError`` if none."""
    fmt = f"int{bits}"
    if fmt not in formats.FORMATS:
        raise ValueError(f"qft has no {bits}-bit affine format (int4, int3, int2 exist)")
    formats.check_block_size(group_size, fmt)
    return fmt


def affine_weight(codes, scales, zeros, shape, dtype, bits: int, group_size: int) -> QuantizedTensor:
    """An int4/3/2 QuantizedTensor from unpacked codes (any integer dtype, row-major over ``shape``),
    per-group scales and zeros: codes re-packed in qft's layout, nothing re-quantized."""
    fmt = affine_format(bits, group_size)
    parts = {
        "codes": formats.packing.pack(codes.reshape(-1), bits),
        "scales": scales.float().reshape(-1),
        "zeros": zeros.to(torch.float16).reshape(-1),
    }
    return check_finite_scales(QuantizedTensor(parts, torch.Size(shape), dtype, fmt, group_size))

"""HQQ-quantized layers (``hqq.core.quantize.HQQLinear``) as qft int4/3/2 weights."""

from __future__ import annotations

import torch

from qft.interop.affine import affine_weight
from qft.tensor import QuantizedTensor


def from_hqq(layer) -> QuantizedTensor:
    """Wrap an ``hqq.core.quantize.HQQLinear`` (axis 1, 4/3/2 bits, group 32/64/128) as int4/3/2.

    Scale and zero are taken as stored (fp16 for HQQ's default compute dtype; a zero in another
    dtype is rounded to fp16, the only rounding this import can add).
    """
    from hqq.core.quantize import Quantizer

    meta = layer.meta
    if meta.get("axis") != 1:
        raise ValueError(f"only HQQ's axis=1 grouping maps to qft's groups, got axis={meta.get('axis')}")
    if meta.get("quant_scale") or meta.get("quant_zero"):
        raise ValueError("HQQ layers with quantized scale/zero are not supported: quantize without them")
    shape = torch.Size(meta["shape"])
    codes = Quantizer.unpack[meta["packing"]](layer.W_q, dtype=torch.uint8).reshape(-1)[: shape.numel()]
    bits, group_size = int(meta["nbits"]), int(meta["group_size"])
    return affine_weight(codes, meta["scale"], meta["zero"], shape, meta["compute_dtype"], bits, group_size)

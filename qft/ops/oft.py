"""Custom op of OFT's input rotation: ``qft::oft_rotate`` (block-diagonal R, or its transpose)."""

from __future__ import annotations

import torch

from qft import reference_oft
from qft.ops.dispatch import backend_for


@torch.library.custom_op("qft::oft_rotate", mutates_args=())
def oft_rotate(x: torch.Tensor, rot: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x`` [M, K] rotated per block by ``rot`` [K / b, b, b] (by R^T when ``transpose``), computed in
    fp32 and returned in x's dtype."""
    if x.dim() != 2 or rot.dim() != 3 or rot.shape[1] != rot.shape[2] or rot.shape[0] * rot.shape[1] != x.shape[1]:
        raise ValueError(f"rot {tuple(rot.shape)} does not tile x's last dimension {tuple(x.shape)}")
    if backend_for(x.device) == "reference" or x.dtype == torch.float64:
        return reference_oft.rotate(x, rot, transpose)
    from qft.kernels.oft_rotate import rotate

    return rotate(x, rot, transpose)


@oft_rotate.register_fake
def _(x, rot, transpose):
    return torch.empty_like(x)

"""8-bit optimizer state: blockwise (256) dynamic quantization of Adam's moments.

The first moment uses the signed dynamic map, the second the unsigned one (bitsandbytes' scheme);
each block of 256 values keeps its fp32 absmax. Codes are the nearest map entry to the fp32 ratio.
"""

from __future__ import annotations

import functools

import torch

from qft import formats
from qft.reference import _blocks

BLOCK = 256


def _map(signed: bool, device) -> torch.Tensor:
    return formats.dynamic_map(device) if signed else formats.unsigned_dynamic_map(device)


@functools.lru_cache(maxsize=8)
def _midpoints(signed: bool, device: torch.device) -> torch.Tensor:
    table = _map(signed, device)
    return (table[:-1] + table[1:]) / 2


def quantize(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [n], absmax fp32 [blocks])`` of a flat fp32 tensor."""
    blocks = _blocks(values.reshape(-1).float(), BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = blocks / absmax.clamp(min=formats.ABSMAX_FLOOR).unsqueeze(1)
    codes = torch.bucketize(scaled, _midpoints(signed, values.device))
    return codes.reshape(-1)[: values.numel()].to(torch.uint8), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values (flat) of ``quantize``'s output: ``map[code] * absmax``."""
    values = _blocks(_map(signed, codes.device)[codes.long()], BLOCK) * absmax.unsqueeze(1)
    return values.reshape(-1)[: codes.numel()]


def tables(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, unsigned map, signed midpoints, unsigned midpoints) on ``device``, for kernels."""
    device = torch.device(device)
    return _map(True, device), _map(False, device), _midpoints(True, device), _midpoints(False, device)

"""The 8-bit optimizer-state format: blockwise (256) dynamic quantization of Adam's moments.

The first moment uses the signed dynamic map, the second the unsigned one (bitsandbytes' scheme);
each block of 256 values keeps its fp32 absmax. Codes are the nearest map entry to the fp32 ratio.
"""

from __future__ import annotations

import functools

import torch

from qft import formats
from qft.formats.packing import blocks as _blocks

BLOCK = 256


def _map(signed: bool, device) -> torch.Tensor:
    return formats.dynamic_map(device) if signed else formats.unsigned_dynamic_map(device)


@functools.lru_cache(maxsize=8)
def _midpoints(signed: bool, device: torch.device) -> torch.Tensor:
    table = _map(signed, device)
    return (table[:-1] + table[1:]) / 2


@functools.lru_cache(maxsize=8)
def _code_lookup(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first code of each of the 65536 ranges of fp32 values that share their top 16 bits, the
    midpoints with +inf appended). Each such range holds at most one midpoint of either map (checked
    here), so one comparison finishes what the table starts: ``code = first + (mid[first] < x)``."""
    mids = _midpoints(signed, torch.device("cpu"))
    top = torch.arange(65536, dtype=torch.int32)
    # The inverse of _order_key: the smallest and largest fp32 value of each range, as bits.
    negative = top < 0x8000
    high = torch.where(negative, 0xFFFF - top, top - 0x8000)
    low_bits = torch.where(negative, torch.full_like(top, 0xFFFF), torch.zeros_like(top))
    ends = [((high << 16) | low_bits).view(torch.float32), ((high << 16) | (0xFFFF - low_bits)).view(torch.float32)]
    first, last = (torch.bucketize(e.nan_to_num(nan=0.0), mids) for e in ends)
    in_range = ends[0].abs().le(1) & ends[1].abs().le(1)
    if int((last - first)[in_range].max()) > 1:
        raise AssertionError("a 16-bit range of values spans two midpoints")
    padded = torch.cat([mids, torch.tensor([float("inf")])])
    return first.to(torch.int64).to(device), padded.to(device)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of an order-preserving integer key of fp32 values (0..65535)."""
    high = (x.view(torch.int32) >> 16) & 0xFFFF
    return torch.where(high < 0x8000, high + 0x8000, 0xFFFF - high)


def nearest_codes(scaled: torch.Tensor, signed: bool) -> torch.Tensor:
    """Index of the nearest map entry for values in [-1, 1] (ties to the lower code), exactly
    ``torch.bucketize(scaled, midpoints)`` but by table lookup (several times faster on CPU). NaN
    gets some code (its block's absmax is NaN, so the block decodes to NaN whatever the code)."""
    first, mids = _code_lookup(signed, scaled.device)
    lower = first[_order_key(scaled.float().contiguous())]
    return lower + (mids[lower] < scaled)


def quantize(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 [n], absmax fp32 [blocks])`` of a flat fp32 tensor.

    A NaN value is stored as 0: in the block's absmax it would turn all 256 values NaN. So one NaN
    gradient costs one value (its parameter turns NaN, as with torch's AdamW and bitsandbytes' 8-bit
    AdamW on CPU, which also lose that value alone), not a block."""
    values = values.reshape(-1).float()
    values = torch.where(torch.isnan(values), 0.0, values)
    blocks = _blocks(values, BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = blocks / absmax.clamp(min=formats.ABSMAX_FLOOR).unsqueeze(1)
    codes = nearest_codes(scaled, signed)
    return codes.reshape(-1)[: values.numel()].to(torch.uint8), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values (flat) of ``quantize``'s output: ``map[code] * absmax``."""
    values = _blocks(_map(signed, codes.device)[codes.long()], BLOCK) * absmax.unsqueeze(1)
    return values.reshape(-1)[: codes.numel()]


def tables(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, unsigned map, signed midpoints, unsigned midpoints) on ``device``, for kernels."""
    device = torch.device(device)
    return _map(True, device), _map(False, device), _midpoints(True, device), _midpoints(False, device)

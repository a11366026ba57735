"""Double quantization of the per-block scales (bitsandbytes' ``compress_statistics``), and the
8-bit dynamic maps it and the 8-bit optimizers use.

``offset = mean(scales)``; the centred scales are quantized in blocks of ``nested_block_size`` (256)
with the signed 8-bit dynamic map, each block scaled by its fp32 absmax. qft picks the nearest code
(exact, in fp64), where bitsandbytes' CPU path uses a lookup table that is only approximately nearest
(0.2% of codes differ on normal weights); when all scales are equal qft stores code 127 and
bitsandbytes 0 (both decode alike). Decode: ``map[q] * nested_scale + offset``, each step rounded to
fp32. Stored parts: ``scales`` become uint8 codes, plus ``nested_scales`` (fp32 per nested block) and
``offset`` (fp32, 0-dim).
"""

from __future__ import annotations

import functools

import torch

from qft.formats import tables
from qft.formats.packing import blocks, num_blocks

NESTED_BLOCK_SIZE = 256
# bitsandbytes clamps absmax to this before taking its reciprocal (all-zero blocks).
ABSMAX_FLOOR = 1e-38


@functools.cache
def _signed_map_cpu() -> torch.Tensor:
    # Signed 8-bit dynamic map (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep
    # Learning"): 7 decades 1e-6..1; decade i holds the 2**i midpoints of linspace(0.1, 1, 2**i + 1)
    # scaled by 10**(i-6), both signs, plus 0 and 1.0: 256 values, sorted. Built in fp32 step by
    # step so the values are bit-identical to bitsandbytes' create_dynamic_map(signed=True).
    values: list[float] = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1, 2**decade + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (decade - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _unsigned_map_cpu() -> torch.Tensor:
    # The unsigned map (bitsandbytes' create_dynamic_map(signed=False)): the signed construction
    # without its negative half, one more fraction bit per decade: 7 decades holding the 2**(i+1)
    # midpoints of linspace(0.1, 1, 2**(i+1) + 1) scaled by 10**(i-6), plus 0 and 1.
    values: list[float] = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (decade + 1) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (decade - 6) * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map used for double quantization, ``fp32 [256]`` ascending."""
    return tables.on_device(_signed_map_cpu, device)


def unsigned_dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The unsigned 8-bit dynamic map (8-bit optimizers' second moment), ``fp32 [256]`` ascending."""
    return tables.on_device(_unsigned_map_cpu, device)


def blockwise_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 max |x| of each block of the row-major flattened ``w``: ``[num_blocks]``."""
    return blocks(w.reshape(-1).float(), block_size).abs().amax(dim=1)


def quantize(scales: torch.Tensor, nested_block_size: int = NESTED_BLOCK_SIZE):
    """Double-quantize fp32 scales: ``(codes uint8 [n], nested_scales fp32 [blocks2], offset fp32 [])``.

    Each centred value takes the nearest code of the dynamic map; the choice is made in fp64 so it
    is the true nearest (exact ties, measure zero, take the lower code).
    """
    offset = scales.mean()
    centred = scales - offset
    nested = blockwise_absmax(centred, nested_block_size)
    ratio = blocks(centred.double(), nested_block_size) / nested.double().clamp(min=ABSMAX_FLOOR).unsqueeze(1)
    dmap = dynamic_map(scales.device).double()
    codes = torch.bucketize(ratio.reshape(-1)[: scales.numel()], (dmap[:-1] + dmap[1:]) / 2)
    return codes.to(torch.uint8), nested, offset


def dequantize(
    codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor, nested_block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """Recover fp32 scales: ``fl(fl(map[q] * nested_scale) + offset)``."""
    values = dynamic_map(codes.device)[codes.long()]
    scaled = blocks(values, nested_block_size) * nested.unsqueeze(1)
    return scaled.reshape(-1)[: codes.numel()] + offset


def nested_blocks(scale_count: int, nested_block_size: int) -> int:
    """Nested scales for ``scale_count`` block scales."""
    return num_blocks(scale_count, nested_block_size)

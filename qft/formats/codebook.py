"""What every code-book format shares: a table of values in units of the block scale, decoded as
``code[q] * scale`` in fp32 (one rounding) and rounded to nearest even in the output dtype, and the
tables the kernels read (thresholds, encode order, byte pairs)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from qft.formats import packing, tables
from qft.formats.parts import PartSpec, codes_and_scales


@dataclass(frozen=True)
class CodebookFormat:
    """An absmax-scaled lookup-table format of ``bits`` bits.

    ``code[i]`` is the value of code ``i`` (in units of the block scale). ``encode_order`` lists the
    codes in ascending order of value; encoding counts thresholds in that order.
    """

    name: str
    bits: int
    code: tuple[float, ...]
    encode_order: tuple[int, ...]
    affine = False
    stores_zeros = False  # a per-block zero beside the scale (``qft.formats.icq``'s variants)

    @property
    def zero_code(self) -> int:
        """The code that 0.0 encodes to, used to pad a partial packing unit."""
        below = int((thresholds(self.name) < 0).sum())
        return self.encode_order[below]

    def stored_parts(self, numel: int, block_size: int) -> list[PartSpec]:
        """Packed codes and one scale per block (``parts.layout`` adds double quantization)."""
        return codes_and_scales(self.bits, numel, block_size)

    def encode(self, scaled: torch.Tensor) -> torch.Tensor:
        """Code of each value of ``scaled`` (in [-1, 1]): thresholds strictly below, reordered."""
        position = torch.bucketize(scaled, thresholds(self.name, scaled.device), out_int32=True)
        return encode_order(self.name, scaled.device)[position.long()].to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype, zeros=None):
        """``code[q] * scale`` in fp32, rounded to ``dtype``; ``codes`` unpacked, flat output."""
        n = codes.numel()
        values = packing.blocks(code(self.name, codes.device)[codes.long()], block_size) * scales.unsqueeze(1)
        return values.reshape(-1)[:n].to(dtype)


def normal_float(bits: int) -> tuple[float, ...]:
    """The NormalFloat code book of ``bits`` bits, built as QLoRA's NF4 (Dettmers et al. 2023,
    "QLoRA", section 3 and bitsandbytes' ``create_normal_map``): N(0,1) quantiles of 2**(bits-1) points
    of ``linspace(offset, 0.5)`` for the positive half and 2**(bits-1) - 1 for the negative half, plus
    an exact zero, divided by the largest. ``offset`` lies halfway between 1 - 1/(2 (2**bits - 1)) and
    1 - 1/2**(bits+1), written to 7 decimals as bitsandbytes writes NF4's (0.9677083). The steps
    follow bitsandbytes' rounding (fp32 linspace, fp64 quantiles, fp32 values and division), so
    ``normal_float(4)`` is its NF4 table bit for bit."""
    size = 2**bits
    offset = round((1 - 1 / (2 * (size - 1)) + 1 - 1 / (2 * size)) / 2, 7)

    def quantiles(count: int) -> torch.Tensor:
        p = torch.linspace(offset, 0.5, count + 1, dtype=torch.float32)[:-1].double()
        return (math.sqrt(2) * torch.special.erfinv(2 * p - 1)).float()

    values = torch.cat([quantiles(size // 2), torch.zeros(1), -quantiles(size // 2 - 1)]).sort().values
    return tuple((values / values.max()).tolist())


@functools.cache
def _code_cpu(name: str) -> torch.Tensor:
    from qft.formats import get_format

    fmt = get_format(name)
    if fmt.affine:
        raise ValueError(f"{name} is affine: it has no code book")
    return torch.tensor(fmt.code, dtype=torch.float32)


@functools.cache
def _thresholds_cpu(name: str) -> torch.Tensor:
    from qft.formats import get_format

    ordered = _code_cpu(name)[list(get_format(name).encode_order)]
    return (ordered[:-1] + ordered[1:]) / 2  # fp32 midpoints: (a + b) rounded, then exact /2


@functools.cache
def _encode_order_cpu(name: str) -> torch.Tensor:
    from qft.formats import get_format

    _code_cpu(name)
    return torch.tensor(get_format(name).encode_order, dtype=torch.int32)


@functools.cache
def _byte_pairs_cpu(name: str) -> torch.Tensor:
    values = _code_cpu(name)
    if values.numel() != 16:
        raise ValueError(f"{name} has {values.numel()} codes: byte pairs exist for 4-bit code books only")
    pairs = torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=1)  # [256, 2]
    return pairs.contiguous().view(torch.int64).view(256)


def code(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The format's fp32 code book, ``[2**bits]``, indexed by code."""
    return tables.on_device(_code_cpu, device, name)


def thresholds(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``2**bits - 1`` fp32 decision thresholds between adjacent codes, in ascending order."""
    return tables.on_device(_thresholds_cpu, device, name)


def encode_order(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """``int32 [2**bits]``: position among ascending thresholds -> code."""
    return tables.on_device(_encode_order_cpu, device, name)


def byte_pairs(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """``int64 [256]``: packed byte -> its two fp32 values (high nibble first) in one 8-byte word, for
    4-bit code books. One gather per byte decodes two values; ``.view(torch.float32)`` splits them."""
    return tables.on_device(_byte_pairs_cpu, device, name)

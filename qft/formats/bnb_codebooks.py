"""nf4 and fp4: bitsandbytes' 4-bit code books, stored byte for byte as bitsandbytes 0.50.2 stores
them (the exceptions, all in favour of accuracy, are listed below and in ``double_quant``).

* Blocks: the weight is flattened row-major and cut into blocks of ``block_size`` values
  (32..4096, a power of two, default 64); the last block may be partial. Each block stores its
  fp32 absmax (max |x|) as its scale.
* Encode: ``s = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)`` in fp32 for full blocks; the partial
  tail block uses ``x / max(absmax, 1e-38)`` instead, as bitsandbytes' CPU path does (the two can
  differ by one ulp). The code is the number of thresholds strictly below ``s`` (fp32 midpoints of
  adjacent code values in ascending order, so a tie takes the lower code), mapped through the
  format's ``encode_order``. Packed two per byte (``packing``); decoded as every code book is.
* FP4 signed zero: bitsandbytes' CPU path gives ``0 < s <= 0.0026`` the code of -0.0 (8) and
  ``-0.0026 < s <= 0`` the code of +0.0 (0); its CUDA path follows the sign of ``s``. qft follows the
  CPU path (the oracle it is tested against); both codes decode to zero.
* Decode: subnormal results stay subnormal (bitsandbytes' AVX-512 bf16 CPU path flushes them).
  A partial last block whose values are all zero or subnormal keeps its true absmax (0, or the
  subnormal maximum), where bitsandbytes stores 1e-38; qft then decodes subnormal FP4 values that
  bitsandbytes loses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qft.formats import packing
from qft.formats.codebook import CodebookFormat, normal_float
from qft.formats.double_quant import ABSMAX_FLOOR, blockwise_absmax

# bitsandbytes' FP4: bit 3 is the sign, bits 0-2 index these magnitudes (before /12).
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# FP4 codes by ascending value. +0.0 (0) precedes -0.0 (8): the bitsandbytes CPU tie order.
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)
# Values per step of the CPU loops: a multiple of every block size, small enough that the
# intermediates stay in cache (4x faster than whole-tensor steps on a 235M-value weight).
_CHUNK = 1 << 20


def _fp4_code() -> tuple[float, ...]:
    # Divide in fp32, as bitsandbytes builds its table, so every value is bit-identical.
    raw = torch.tensor(list(_FP4_MAGNITUDES) + [-m for m in _FP4_MAGNITUDES], dtype=torch.float32)
    return tuple((raw / 12.0).tolist())


def scale_to_unit(w: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Scale each block into [-1, 1] exactly as bitsandbytes does: ``[num_blocks, block_size]``.

    Full blocks multiply by the fp32 reciprocal of absmax; a partial tail block divides.
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    floored = absmax.clamp(min=ABSMAX_FLOOR)
    scaled = packing.blocks(flat, block_size) * (1.0 / floored).unsqueeze(1)
    tail = n % block_size
    if tail:
        scaled[-1, :tail] = flat[n - tail :] / floored[-1]
    return scaled.clamp_(-1.0, 1.0)


@dataclass(frozen=True)
class BnbCodebookFormat(CodebookFormat):
    """A 4-bit code book scaled by each block's absmax, bitsandbytes' bytes."""

    bnb_compatible = True

    def quantize(self, w: torch.Tensor, block_size: int, method: str = "hqq") -> dict[str, torch.Tensor]:
        """``{"codes": uint8 [(n + 1) // 2], "scales": fp32 absmax [blocks]}`` (``method`` is unused)."""
        flat = w.reshape(-1)
        n = flat.numel()
        codes = torch.empty(packing.packed_numel(n, 4), dtype=torch.uint8, device=w.device)
        absmax = torch.empty(packing.num_blocks(n, block_size), dtype=torch.float32, device=w.device)
        for start in range(0, n, _CHUNK):
            x = flat[start : start + _CHUNK].float()
            chunk_absmax = blockwise_absmax(x, block_size)
            scaled = scale_to_unit(x, chunk_absmax, block_size).reshape(-1)[: x.numel()]
            absmax[start // block_size : start // block_size + chunk_absmax.numel()] = chunk_absmax
            codes[start // 2 : start // 2 + packing.packed_numel(x.numel(), 4)] = packing.pack(
                self.encode(scaled), 4, self.zero_code
            )
        return {"codes": codes, "scales": absmax}


FORMATS = (
    BnbCodebookFormat("nf4", 4, normal_float(4), tuple(range(16))),
    BnbCodebookFormat("fp4", 4, _fp4_code(), _FP4_ORDER),
)

"""3- and 2-bit code books whose block scale is searched: ``lloyd3`` / ``lloyd2`` and ``nf3`` / ``nf2``.

Decoded as every code book (``code[q] * scale``), packed bit-planar (3-bit) or 16 per word (2-bit).
At quantize time each block's scale is chosen from ``absmax * f``, f in ``SCALE_SEARCH`` (least
squared error summed in fp64, the first f wins ties), so the stored scale is <= the block absmax.

* ``lloyd3`` / ``lloyd2``: Lloyd-Max quantizers of N(0,1) weights scaled by their block-64 absmax
  (2^22 samples, symmetric, 300 iterations; ``benchmarks/bench_quality.py`` measures them).
* ``nf3`` / ``nf2``: the NormalFloat construction of NF4 at 3 and 2 bits (``codebook.normal_float``);
  lopsided (one more positive level than negative), as NF4 is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qft.formats import packing
from qft.formats.codebook import CodebookFormat, code, normal_float
from qft.formats.double_quant import ABSMAX_FLOOR

# Scale candidates (fractions of the block absmax) searched when quantizing.
SCALE_SEARCH = tuple(0.7 + 0.025 * i for i in range(13))

# Lloyd-Max tables for block-64 absmax-scaled N(0,1) weights (positive half; symmetric).
_LLOYD3 = (0.0943947, 0.291785, 0.5201229, 0.8326523)
_LLOYD2 = (0.1782987, 0.6022794)


def _symmetric(half: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-v for v in reversed(half)) + half


@dataclass(frozen=True)
class SearchedCodebookFormat(CodebookFormat):
    """A code book whose per-block scale is searched among fractions of the absmax."""

    bnb_compatible = False

    def search_scale(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per block of ``x`` [blocks, size] (zero-padded), the least-error ``absmax * f``; the error
        counts only ``valid`` values when a mask is given (the stored formats count padding)."""
        absmax = x.abs().amax(1).clamp(min=ABSMAX_FLOOR)
        table = code(self.name, x.device)
        best_err = best_scale = None
        for f in SCALE_SEARCH:
            scale = absmax * f
            q = self.encode((x / scale.unsqueeze(1)).clamp(-1, 1)).long()
            err = (table[q] * scale.unsqueeze(1) - x).double() ** 2
            err = (err if valid is None else err * valid).sum(1)
            if best_err is None:
                best_err, best_scale = err, scale
            else:
                better = err < best_err
                best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
        return best_scale

    def encode_blocks(self, x: torch.Tensor, scale: torch.Tensor, numel: int) -> torch.Tensor:
        """Packed codes of ``x`` [blocks, size] under per-block ``scale`` (the first ``numel`` values)."""
        codes = self.encode((x / scale.unsqueeze(1)).clamp(-1, 1)).reshape(-1)[:numel]
        return packing.pack(codes, self.bits, self.zero_code)

    def quantize(self, w: torch.Tensor, block_size: int, method: str = "hqq", scales=None) -> dict[str, torch.Tensor]:
        """``{"codes": packed, "scales": fp32 [blocks]}``; ``scales`` given (a kernel's search) skips
        the search here. ``method`` is for affine formats and unused."""
        x = packing.blocks(w.reshape(-1).float(), block_size)
        scales = self.search_scale(x) if scales is None else scales
        return {"codes": self.encode_blocks(x, scales, w.numel()), "scales": scales}


FORMATS = (
    SearchedCodebookFormat("lloyd3", 3, _symmetric(_LLOYD3), tuple(range(8))),
    SearchedCodebookFormat("lloyd2", 2, _symmetric(_LLOYD2), tuple(range(4))),
    SearchedCodebookFormat("nf3", 3, normal_float(3), tuple(range(8))),
    SearchedCodebookFormat("nf2", 2, normal_float(2), tuple(range(4))),
)

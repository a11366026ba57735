"""Affine integer formats ``int4`` / ``int3`` / ``int2`` (HQQ/GPTQ semantics).

``x = (q - zero) * scale`` per group of 32/64/128 values, q in [0, 2**bits); ``scales`` fp32 (or
double-quantized), ``zeros`` fp16; decoded in fp32 (one rounding per step) and rounded to nearest
even in the output dtype. Quantize picks each group's range by ``method``: ``"rtn"`` min-max,
``"clip"`` least-squares search over shrunken ranges, ``"hqq"`` clip then HQQ's half-quadratic
refinement of the zero (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning
Models"), ``"icq"`` the min-max range scaled by the factor of most code entropy (IR-QLoRA's ICQ for
integers, ``qft.formats.icq``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qft.formats import packing
from qft.formats.icq import ICQ_RANGE, ICQ_STEPS, code_entropy, keep_better
from qft.formats.parts import PartSpec, codes_and_scales

GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "clip", "hqq", "icq")
# HQQ's solver settings: lp-norm p, initial penalty beta growing by kappa, fixed iterations.
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_ITERS = 0.7, 10.0, 1.01, 20
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # range shrink factors searched by "clip"


@dataclass(frozen=True)
class AffineFormat:
    """An integer format ``x = (q - zero) * scale`` per group, q in [0, 2**bits)."""

    name: str
    bits: int
    affine = True
    bnb_compatible = False
    stores_zeros = True
    zero_code = 0

    @property
    def max_code(self) -> int:
        """The largest code, ``2**bits - 1``."""
        return 2**self.bits - 1

    def stored_parts(self, numel: int, block_size: int) -> list[PartSpec]:
        """Packed codes, one fp32 scale and one fp16 zero per group."""
        specs = codes_and_scales(self.bits, numel, block_size)
        return [*specs, PartSpec("zeros", torch.float16, packing.num_blocks(numel, block_size))]

    def quantize(self, w: torch.Tensor, block_size: int, method: str = "hqq", scales=None, zeros=None):
        """``{"codes": packed, "scales": fp32 [groups], "zeros": fp16 [groups]}``; a range searched
        elsewhere (a kernel) comes in as ``scales`` and ``zeros`` (fp32)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        x, valid = packing.blocks_with_mask(w, block_size)
        if scales is None and method == "icq":
            scales, zeros = icq_range(x, valid, self.max_code)
        elif scales is None:
            scales, zeros = search_range(x, valid, self.max_code, search=method != "rtn")
        if method == "hqq":
            zeros = _hqq_refine_zero(x, valid, scales, zeros, self.max_code)
        zeros = zeros.to(torch.float16)  # stored in fp16: quantize against what decodes
        codes = _codes(x, scales.unsqueeze(1), zeros.float().unsqueeze(1), self.max_code)
        return {"codes": packing.pack(codes.reshape(-1)[: w.numel()], self.bits), "scales": scales, "zeros": zeros}

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype, zeros=None):
        """``(q - zero) * scale`` in fp32, rounded to ``dtype``; ``codes`` unpacked, flat output."""
        n = codes.numel()
        q = packing.blocks(codes.float(), block_size)
        values = (q - zeros.float().unsqueeze(1)) * scales.unsqueeze(1)
        return values.reshape(-1)[:n].to(dtype)


def _codes(x, scale, zero, max_code):
    return torch.round(x / scale + zero).clamp(0, max_code)


def _from_range(lo, hi, max_code):
    scale = (hi - lo) / max_code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0 decodes to lo
    return scale, -lo / scale


def search_range(x, valid, max_code: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group from min-max, or from the least-error (fp64 sums) shrunken range."""
    lo = torch.where(valid, x, torch.inf).amin(1)
    hi = torch.where(valid, x, -torch.inf).amax(1)
    scale, zero = _from_range(lo, hi, max_code)
    if not search:
        return scale, zero
    best = None
    for f in CLIP_GRID:
        s, z = _from_range(lo * f, hi * f, max_code)
        q = _codes(x, s.unsqueeze(1), z.unsqueeze(1), max_code)
        err = (((q - z.unsqueeze(1)) * s.unsqueeze(1) - x).double() ** 2 * valid).sum(1)
        if best is None:
            best, scale, zero = err, s, z
        else:
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def icq_range(x, valid, max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group: the min-max range scaled by the p in ``[1 - ICQ_RANGE, 1 + ICQ_RANGE]``
    (``2 * ICQ_STEPS + 1`` values, p = 1 first) whose codes have the most entropy (ties: least error)."""
    lo = torch.where(valid, x, torch.inf).amin(1)
    hi = torch.where(valid, x, -torch.inf).amax(1)
    best = None
    for p in [1.0, *torch.linspace(1 - ICQ_RANGE, 1 + ICQ_RANGE, 2 * ICQ_STEPS + 1).tolist()]:
        scale, zero = _from_range(lo * p, hi * p, max_code)
        q = _codes(x, scale.unsqueeze(1), zero.unsqueeze(1), max_code)
        error = ((((q - zero.unsqueeze(1)) * scale.unsqueeze(1) - x).double() ** 2) * valid).sum(1)
        best = keep_better(best, code_entropy(q, valid, max_code + 1), error, scale, zero)
    return best[2], best[3]


def _hqq_refine_zero(x, valid, scale, zero, max_code):
    """HQQ's proximal solver: sparse error W_e by an lp shrinkage, zero = mean of (q - (x - W_e)/s)."""
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    beta = HQQ_BETA
    count = valid.sum(1, keepdim=True).clamp(min=1)
    for _ in range(HQQ_ITERS):
        q = _codes(x, s, z, max_code)
        residual = x - (q - z) * s
        shrunk = torch.sign(residual) * torch.relu(
            residual.abs() - residual.abs().clamp(min=1e-12) ** (HQQ_P - 1) / beta
        )
        z = ((q - (x - shrunk) / s) * valid).sum(1, keepdim=True) / count
        beta *= HQQ_KAPPA
    return z.squeeze(1)


FORMATS = (AffineFormat("int4", 4), AffineFormat("int3", 3), AffineFormat("int2", 2))

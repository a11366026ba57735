"""ICQ, IR-QLoRA's information calibration quantization (Qin et al. 2024, "Accurate LoRA-Finetuning
Quantization of LLMs via Information Retention"): each block is shifted by an offset tau before it is
scaled and encoded, tau chosen among candidates around the block's median to maximise the entropy of the
block's codes (the information the quantized block retains).

* Code books: ``nf4_icq``, ``lloyd3_icq``, ``lloyd2_icq`` store the codes and scale of their base code
  book plus a per-block fp16 ``zeros`` part, decoded ``(code[q] - zero) * scale`` (``zero = -tau /
  scale``), the affine formats' arithmetic with a code book's level for q. The candidates are IR-QLoRA's:
  ``tau = f * absmax(x - median) + median`` for ``2 * ICQ_STEPS + 1`` values of f evenly spaced in
  ``[-ICQ_RANGE * sigma, ICQ_RANGE * sigma]`` (sigma = 1 / Phi^-1(0.9677083), NF4's outermost quantile),
  scale ``absmax(x - tau)`` (times the base's searched fraction for the Lloyd code books).
  IR-QLoRA keeps tau in 8 bits with a second-level scale per 256 blocks; qft keeps the zero in fp16 as
  the affine formats do (16 bits per block), so the kernels decode every weight with zeros one way.
* Affine formats: ``method="icq"`` scales each group's min-max range by p in ``[1 - ICQ_RANGE, 1 +
  ICQ_RANGE]`` (IR-QLoRA's integer quantizer) and keeps the p of the most code entropy; the zero is
  already stored.

Blocks whose candidates tie on entropy keep the least squared error among them; a block whose offset
would be more than ``MAX_ZERO`` scales (a nearly constant block away from zero) keeps no offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

from qft.formats import packing
from qft.formats.codebook import CodebookFormat, code
from qft.formats.double_quant import ABSMAX_FLOOR
from qft.formats.parts import PartSpec, codes_and_scales

ICQ_RANGE, ICQ_STEPS = 0.1, 50  # IR-QLoRA's tau_range and tau_n (its released defaults)
# A block whose offset is more than MAX_ZERO scales away (nearly constant, off zero) keeps tau = 0: its
# fp16 zero would round by more than 2^-7 scales (or overflow, for a constant block).
MAX_ZERO = 16.0
SIGMA = 1 / NormalDist().inv_cdf(0.9677083)  # IR-QLoRA's sigma: NF4's outermost quantile (about 0.5411)
_ENTROPY_TIE = 1e-9  # entropies closer than this are equal (sums of the same terms in another order)


def code_entropy(codes: torch.Tensor, valid: torch.Tensor, levels: int) -> torch.Tensor:
    """Entropy in bits of each row's codes (``codes`` [blocks, size] ints, only ``valid`` ones counted)."""
    counts = torch.zeros(codes.shape[0], levels, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, codes.long(), valid.double())
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(1)


def keep_better(best, entropy: torch.Tensor, error: torch.Tensor, *values: torch.Tensor):
    """``(entropy, error, *values)`` per block from ``best`` or the new candidate, whichever has more
    entropy (ties: less error); ``best`` None takes the candidate."""
    if best is None:
        return (entropy, error, *values)
    more = entropy > best[0] + _ENTROPY_TIE
    tie = (entropy - best[0]).abs() <= _ENTROPY_TIE
    better = more | (tie & (error < best[1]))
    return tuple(torch.where(better, new, old) for new, old in zip((entropy, error, *values), best, strict=True))


@dataclass(frozen=True)
class IcqCodebookFormat(CodebookFormat):
    """A code book (``base``) whose blocks are shifted by an entropy-maximising offset, kept as a zero."""

    base: CodebookFormat | None = None
    bnb_compatible = False
    stores_zeros = True

    def stored_parts(self, numel: int, block_size: int) -> list[PartSpec]:
        """The base's codes and scales, and one fp16 zero per block."""
        specs = codes_and_scales(self.bits, numel, block_size)
        return [*specs, PartSpec("zeros", torch.float16, packing.num_blocks(numel, block_size))]

    def search(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, tau) per block of ``x`` [blocks, size]: the candidate of most code entropy."""
        padded = torch.where(valid, x, torch.nan)
        median = padded.nanmedian(1).values.nan_to_num(0.0).unsqueeze(1)
        spread = torch.where(valid, (x - median).abs(), 0.0).amax(1, keepdim=True).clamp(min=ABSMAX_FLOOR)
        fraction = 1.0
        if hasattr(self.base, "search_scale"):  # a searched code book keeps its clipping
            centred = torch.where(valid, x - median, 0.0)
            fraction = (self.base.search_scale(centred, valid).unsqueeze(1) / spread).clamp(max=1.0)
        table = code(self.name, x.device)
        best = None
        for f in torch.linspace(-ICQ_RANGE * SIGMA, ICQ_RANGE * SIGMA, 2 * ICQ_STEPS + 1).tolist():
            tau = median + f * spread
            shifted = torch.where(valid, x - tau, 0.0)
            scale = (shifted.abs().amax(1, keepdim=True) * fraction).clamp(min=ABSMAX_FLOOR)
            codes = self.encode((shifted / scale).clamp(-1, 1))
            error = (((table[codes.long()] * scale - shifted).double() ** 2) * valid).sum(1)
            best = keep_better(best, code_entropy(codes, valid, len(self.code)), error, scale[:, 0], tau[:, 0])
        scale, tau = best[2], best[3]
        far = tau.abs() > MAX_ZERO * scale
        if bool(far.any()):  # the base code book's own scale, no offset
            plain = torch.where(valid, x, 0.0)
            own = self.base.search_scale(plain, valid) if hasattr(self.base, "search_scale") else None
            own = plain.abs().amax(1).clamp(min=ABSMAX_FLOOR) if own is None else own
            scale, tau = torch.where(far, own, scale), torch.where(far, torch.zeros_like(tau), tau)
        return scale, tau

    def quantize(self, w: torch.Tensor, block_size: int, method: str = "hqq", scales=None, zeros=None):
        """``{"codes", "scales" fp32, "zeros" fp16}``: the ICQ search, or ``scales`` and ``zeros`` given
        (GPTQ's static groups re-encode against them). ``method`` is for affine formats and unused."""
        x, valid = packing.blocks_with_mask(w, block_size)
        if scales is None:
            scales, tau = self.search(x, valid)
            zeros = (-tau / scales).to(torch.float16)  # stored in fp16: encode against what decodes
        scaled = (x / scales.unsqueeze(1) + zeros.float().unsqueeze(1)).clamp(-1, 1)
        codes = self.encode(scaled).reshape(-1)[: w.numel()]
        return {"codes": packing.pack(codes, self.bits, self.zero_code), "scales": scales, "zeros": zeros}

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype, zeros=None):
        """``(code[q] - zero) * scale`` in fp32 (one rounding per step), rounded to ``dtype``."""
        n = codes.numel()
        levels = packing.blocks(code(self.name, codes.device)[codes.long()], block_size)
        values = (levels - zeros.float().unsqueeze(1)) * scales.unsqueeze(1)
        return values.reshape(-1)[:n].to(dtype)


def icq_variant(base: CodebookFormat) -> IcqCodebookFormat:
    """``base`` with ICQ's offsets: named ``<base>_icq``, the same code book and code order."""
    return IcqCodebookFormat(f"{base.name}_icq", base.bits, base.code, base.encode_order, base)

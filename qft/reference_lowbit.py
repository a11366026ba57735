"""Pure-torch 3-/2-bit code-book and affine int4/3/2 quantization: the CPU path and the oracle.

``qft/formats.py`` documents the formats and the packing; this module fixes their arithmetic.
Codes are handled as flat uint8 tensors; ``pack``/``unpack`` convert to the stored words.
"""

from __future__ import annotations

import torch

from qft import formats
from qft.reference import _blocks

# HQQ's half-quadratic solver settings (Badri & Shaji 2023, "Half-Quadratic Quantization of Large
# Machine Learning Models"): lp-norm p, initial penalty beta growing by kappa, fixed iterations.
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_ITERS = 0.7, 10.0, 1.01, 20
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # range shrink factors searched by "clip"
METHODS = ("rtn", "clip", "hqq")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack flat uint8 codes (< 2**bits) as ``formats`` lays them out for 3 or 2 bits (int32 words)."""
    per_word = 32 if bits == 3 else 16
    pad = -codes.numel() % per_word
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(-1, per_word)
    shifts = 2 * torch.arange(16, device=codes.device)
    if bits == 2:
        words = ((c & 3) << shifts).sum(1)
        return words.to(torch.int32)  # int64 sum < 2**32 -> wraps into int32 bit pattern
    low = c & 3
    word0 = (low[:, :16] << shifts).sum(1)
    word1 = (low[:, 16:] << shifts).sum(1)
    word2 = ((c >> 2) << torch.arange(32, device=codes.device)).sum(1)
    return _to_int32(torch.stack([word0, word1, word2], 1).reshape(-1))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``numel`` codes as int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = 2 * torch.arange(16, device=packed.device)
    if bits == 2:
        codes = (words.unsqueeze(1) >> shifts) & 3
        return codes.reshape(-1)[:numel]
    w = words.view(-1, 3)
    low = torch.cat([(w[:, :1] >> shifts) & 3, (w[:, 1:2] >> shifts) & 3], 1)
    high = (w[:, 2:] >> torch.arange(32, device=packed.device)) & 1
    return (low | (high << 2)).reshape(-1)[:numel]


def _encode_codebook(scaled: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.bucketize(scaled, formats.thresholds(fmt, scaled.device))


def quantize_codebook(w: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lloyd3/lloyd2: ``(codes uint8 [n], scale fp32 [blocks])``, each block's scale searched."""
    x = _blocks(w.reshape(-1).float(), block_size)
    scale = search_codebook_scale(x, fmt)
    return codebook_codes(x, scale, fmt, w.numel()), scale


def search_codebook_scale(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per block of ``x`` [blocks, size] (zero-padded), the ``absmax * f``, f in ``SCALE_SEARCH``, with
    the least squared error (summed in fp64; the first f wins ties)."""
    absmax = x.abs().amax(1).clamp(min=formats.ABSMAX_FLOOR)
    table = formats.code(fmt, x.device)
    best_err = best_scale = None
    for f in formats.SCALE_SEARCH:
        scale = absmax * f
        q = _encode_codebook((x / scale.unsqueeze(1)).clamp(-1, 1), fmt)
        err = ((table[q] * scale.unsqueeze(1) - x).double() ** 2).sum(1)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    return best_scale


def codebook_codes(x: torch.Tensor, scale: torch.Tensor, fmt: str, numel: int) -> torch.Tensor:
    """Codes of ``x`` [blocks, size] under per-block ``scale``: flat uint8, first ``numel``."""
    codes = _encode_codebook((x / scale.unsqueeze(1)).clamp(-1, 1), fmt)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _affine_codes(x, scale, zero, max_code):
    return torch.round(x / scale + zero).clamp(0, max_code)


def _affine_from_range(lo, hi, max_code):
    scale = (hi - lo) / max_code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: q = 0 decodes to lo
    return scale, -lo / scale


def quantize_affine(
    w: torch.Tensor, fmt: str, group_size: int, method: str = "hqq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4/int3/int2: ``(codes uint8 [n], scale fp32 [groups], zero fp32 [groups])``.

    ``method``: "rtn" (min-max), "clip" (least-squares search over ``CLIP_GRID`` shrunken ranges),
    "hqq" (clip, then HQQ's half-quadratic refinement of the zero with the scale fixed).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    max_code = formats.get_format(fmt).max_code
    x, valid = affine_blocks(w, group_size)
    scale, zero = affine_range(x, valid, max_code, search=method != "rtn")
    return finish_affine(x, valid, scale, zero, max_code, method, w.numel())


def affine_blocks(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [groups, size] fp32 zero-padded, valid mask)``: padding must not set a group's range."""
    n = w.numel()
    x = _blocks(w.reshape(-1).float(), group_size)
    return x, _blocks(torch.ones(n, device=w.device), group_size) > 0


def affine_range(x, valid, max_code: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group from min-max, or from the least-error (fp64 sums) shrunken range."""
    lo = torch.where(valid, x, torch.inf).amin(1)
    hi = torch.where(valid, x, -torch.inf).amax(1)
    scale, zero = _affine_from_range(lo, hi, max_code)
    if not search:
        return scale, zero
    best = None
    for f in CLIP_GRID:
        s, z = _affine_from_range(lo * f, hi * f, max_code)
        q = _affine_codes(x, s.unsqueeze(1), z.unsqueeze(1), max_code)
        err = (((q - z.unsqueeze(1)) * s.unsqueeze(1) - x).double() ** 2 * valid).sum(1)
        if best is None:
            best, scale, zero = err, s, z
        else:
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def finish_affine(x, valid, scale, zero, max_code: int, method: str, numel: int):
    """HQQ refinement (method "hqq"), the fp16 rounding of the zero, and the codes."""
    if method == "hqq":
        zero = _hqq_refine_zero(x, valid, scale, zero, max_code)
    zero = zero.to(torch.float16).float()  # stored in fp16: quantize against what decodes
    codes = _affine_codes(x, scale.unsqueeze(1), zero.unsqueeze(1), max_code)
    return codes.reshape(-1)[:numel].to(torch.uint8), scale, zero


def _hqq_refine_zero(x, valid, scale, zero, max_code):
    """HQQ's proximal solver: sparse error W_e by an lp shrinkage, zero = mean of (q - (x - W_e)/s)."""
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    beta = HQQ_BETA
    count = valid.sum(1, keepdim=True).clamp(min=1)
    for _ in range(HQQ_ITERS):
        q = _affine_codes(x, s, z, max_code)
        residual = x - (q - z) * s
        shrunk = torch.sign(residual) * torch.relu(
            residual.abs() - residual.abs().clamp(min=1e-12) ** (HQQ_P - 1) / beta
        )
        z = ((q - (x - shrunk) / s) * valid).sum(1, keepdim=True) / count
        beta *= HQQ_KAPPA
    return z.squeeze(1)


def dequantize_codebook(codes: torch.Tensor, scale: torch.Tensor, fmt: str, block_size: int, dtype) -> torch.Tensor:
    """``code[q] * scale`` in fp32, rounded to ``dtype``; flat."""
    n = codes.numel()
    values = _blocks(formats.code(fmt, codes.device)[codes.long()], block_size) * scale.unsqueeze(1)
    return values.reshape(-1)[:n].to(dtype)


def dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype):
    """``(q - zero) * scale`` in fp32, rounded to ``dtype``; flat."""
    n = codes.numel()
    q = _blocks(codes.float(), group_size)
    values = (q - zero.float().unsqueeze(1)) * scale.unsqueeze(1)
    return values.reshape(-1)[:n].to(dtype)

"""GPTQ-style error feedback for every format (Frantar et al. 2023, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1 with its lazy batch updates).

Given a layer's weight W [N, K] and ``H = X^T X / n`` from calibration inputs X [n, K], the columns are
rounded one at a time to the format's grid and each column's rounding error, scaled by the inverse
Hessian's Cholesky factor, is pushed onto the columns not yet rounded, so that ``||X W^T - X Q^T||``
rather than ``||W - Q||`` is what the rounding minimises.

The blocks' scales (and zeros) are fixed before the loop, from the format's own search on W, and
double-quantized first when the weight keeps 8-bit scales ("static groups"): the codes are chosen against
exactly the scales that decode them, and with ``act_order`` (columns in descending order of H's
diagonal) the groups stay contiguous, so the result is an ordinary weight of its format, with no column
permutation to store. The blocks must lie inside rows (``block_size`` divides K).
"""

from __future__ import annotations

import torch

from qft.formats import Weight, code, decoded_scales, get_format, packing, quantize

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean (GPTQ's default)
LAZY_COLUMNS = 128  # columns rounded between two updates of the rest (GPTQ's lazy batch)


def damped(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """A copy of ``hessian`` with ``damp * mean(diag)`` added to its diagonal (at least 1e-12 times damp):
    GPTQ's damping, which ApiQ's fits share."""
    h = hessian.clone()
    h.diagonal().add_(damp * max(float(torch.diagonal(h).mean()), 1e-12))
    return h


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of ``(H + damp mean(diag H) I)^-1`` (dead columns, whose
    inputs were always zero, get a diagonal of 1), and the dead columns' mask."""
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h = damped(h, damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


def _grid(fmt, scales: torch.Tensor, zeros: torch.Tensor | None):
    """``round(column, group) -> (values on the format's grid, codes)`` for per-block scales/zeros [N, G]
    (zeros None for a code book that stores none)."""
    if fmt.affine:

        def round_affine(w, g):
            q = torch.round(w / scales[:, g] + zeros[:, g]).clamp(0, fmt.max_code)
            return (q - zeros[:, g]) * scales[:, g], q

        return round_affine
    table = code(fmt.name, scales.device).to(scales.dtype)

    def round_codebook(w, g):
        codes = fmt.encode((w / scales[:, g]).clamp(-1, 1).float())
        return table[codes.long()] * scales[:, g], codes

    def round_codebook_with_zeros(w, g):  # ICQ's code books: (code[q] - zero) * scale
        codes = fmt.encode((w / scales[:, g] + zeros[:, g]).clamp(-1, 1).float())
        return (table[codes.long()] - zeros[:, g]) * scales[:, g], codes

    return round_codebook if zeros is None else round_codebook_with_zeros


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str,
    block_size: int,
    method: str = "hqq",
    nested: bool = False,
    act_order: bool = False,
    damp: float = DAMP,
    dtype: torch.dtype = torch.float32,
) -> Weight:
    """W [N, K] quantized with error feedback under ``hessian`` [K, K] (``X^T X / n``), as a ``Weight`` of
    ``fmt``: the scales (and zeros) of ``quantize(w, fmt, block_size, method, nested)``, new codes.

    ``act_order`` rounds columns in descending order of H's diagonal; ``dtype`` is the working precision
    (fp64 for references). ``ValueError`` unless W is 2-D, H is [K, K] and ``block_size`` divides K.
    """
    if w.dim() != 2:
        raise ValueError(f"gptq quantizes a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of {k} input features, got {tuple(hessian.shape)}")
    if k % block_size:
        raise ValueError(f"gptq needs block_size {block_size} to divide the {k} input features")
    form = get_format(fmt)
    start = quantize(w, fmt, block_size, method, nested)  # the static scales (double-quantized if nested)
    scales = decoded_scales(start).to(dtype).view(n, k // block_size)
    zeros = start.zeros.to(dtype).view(n, k // block_size) if form.stores_zeros else None
    round_to_grid = _grid(form, scales, zeros)

    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(k)
    order = order.to(w.device)
    h = hessian.to(w.device, dtype)[order][:, order]
    u, dead = inverse_hessian_factor(h, damp)
    work = w.to(dtype)[:, order].clone()
    work[:, dead] = 0
    codes = torch.empty((n, k), dtype=torch.float32 if form.affine else torch.uint8, device=w.device)
    groups = (order // block_size).tolist()
    for i1 in range(0, k, LAZY_COLUMNS):
        i2 = min(i1 + LAZY_COLUMNS, k)
        block, errors = work[:, i1:i2].clone(), torch.empty((n, i2 - i1), dtype=dtype, device=w.device)
        for j in range(i2 - i1):
            column = block[:, j]
            values, codes[:, order[i1 + j]] = round_to_grid(column, groups[i1 + j])
            errors[:, j] = (column - values) / u[i1 + j, i1 + j]
            block[:, j:].sub_(errors[:, j : j + 1] * u[i1 + j, i1 + j : i2])
        work[:, i2:].sub_(errors @ u[i1:i2, i2:])
    packed = packing.pack(codes.reshape(-1), form.bits, form.zero_code)
    return Weight({**start.parts, "codes": packed}, fmt, w.numel(), block_size, start.nested_block_size)

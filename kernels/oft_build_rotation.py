"""Triton kernels that build OFT's block rotations R (applied by ``oft_apply_rotation``) from the skew
parameters by Cayley-Neumann, and the backward from dL/dR to dL/d(parameters), for every block in
one launch (one program a block).

Math (``qft.reference``): Q = U - U^T with U the strict upper triangle in ``triu_indices``
order; R = I + sum_{k=1..K} c_k Q^k with c_k = 2 for k <= m and c_{m+1} = 1 (K = m + 1,
m = max(2, n - 2), for n >= 3 terms; n = 2: R = I + 2Q). Backward: with P = Q^T and G = dL/dR,
dL/dQ = sum_k c_k T_k where T_1 = G and T_{k+1} = P T_k + G P^k (T_k = sum_j P^j G P^(k-1-j));
then dL/dU[i, j] = dQ[i, j] - dQ[j, i] for i < j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr):
    """fp32 [B, B] @ [B, B]; tl.dot needs B >= 16, smaller blocks multiply by broadcasting."""
    if USE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:  # an else keeps the [B, B, B] product out of the traced graph when USE_DOT
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _triu_index(i, j, B: tl.constexpr):
    """Position of U[i, j] (i < j) in ``triu_indices(B, B, 1)`` order."""
    return i * (2 * B - i - 1) // 2 + (j - i - 1)


@triton.jit
def _load_skew(params_ptr, blk, i, j, B: tl.constexpr):
    row = params_ptr + blk * (B * (B - 1) // 2)
    upper = tl.load(row + _triu_index(i, j, B), mask=i < j, other=0.0).to(tl.float32)
    lower = tl.load(row + _triu_index(j, i, B), mask=j < i, other=0.0).to(tl.float32)
    return upper - lower


@triton.jit
def _rotation_kernel(params_ptr, rot_ptr, B: tl.constexpr, TERMS: tl.constexpr, USE_DOT: tl.constexpr):
    blk = tl.program_id(0)
    i = tl.arange(0, B)[:, None]
    j = tl.arange(0, B)[None, :]
    q = _load_skew(params_ptr, blk, i, j, B)
    r = tl.where(i == j, 1.0, 0.0)
    if TERMS > 1:
        r = r + 2.0 * q
    if TERMS > 2:
        power = q
        for k in tl.static_range(2, max(2, TERMS - 2) + 2):
            power = _mm(power, q, USE_DOT)
            r = r + (2.0 if k <= max(2, TERMS - 2) else 1.0) * power
    tl.store(rot_ptr + blk * B * B + i * B + j, r)


@triton.jit
def _rotation_grad_kernel(
    params_ptr, grad_rot_ptr, grad_params_ptr, B: tl.constexpr, TERMS: tl.constexpr, USE_DOT: tl.constexpr
):
    blk = tl.program_id(0)
    i = tl.arange(0, B)[:, None]
    j = tl.arange(0, B)[None, :]
    g = tl.load(grad_rot_ptr + blk * B * B + i * B + j).to(tl.float32)
    grad_q = tl.zeros((B, B), dtype=tl.float32)
    if TERMS > 1:
        grad_q = 2.0 * g
    if TERMS > 2:
        p = _load_skew(params_ptr, blk, j, i, B)  # Q^T
        term = g
        power = p
        for k in tl.static_range(2, max(2, TERMS - 2) + 2):
            term = _mm(p, term, USE_DOT) + _mm(g, power, USE_DOT)
            grad_q = grad_q + (2.0 if k <= max(2, TERMS - 2) else 1.0) * term
            power = _mm(power, p, USE_DOT)
    grad_u = grad_q - tl.trans(grad_q)
    out = grad_params_ptr + blk * (B * (B - 1) // 2) + _triu_index(i, j, B)
    tl.store(out, grad_u, mask=i < j)


def _check(params: torch.Tensor, block_size: int) -> None:
    if params.dim() != 2 or params.shape[1] != block_size * (block_size - 1) // 2:
        raise ValueError(f"params must be [blocks, {block_size * (block_size - 1) // 2}], got {tuple(params.shape)}")
    if block_size & (block_size - 1) or block_size < 2:
        raise ValueError(f"the Triton rotation needs a power-of-two block_size, got {block_size}")


def rotation(params: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """R ``[blocks, b, b]`` fp32 from skew parameters ``[blocks, b(b-1)/2]`` (Cayley-Neumann, n terms)."""
    _check(params, block_size)
    params = params.float().contiguous()
    rot = torch.empty(params.shape[0], block_size, block_size, device=params.device, dtype=torch.float32)
    _rotation_kernel[(params.shape[0],)](params, rot, B=block_size, TERMS=terms, USE_DOT=block_size >= 16)
    return rot


def rotation_grad(params: torch.Tensor, grad_rot: torch.Tensor, block_size: int, terms: int) -> torch.Tensor:
    """dL/d(params) ``[blocks, b(b-1)/2]`` fp32 from dL/dR ``[blocks, b, b]``."""
    _check(params, block_size)
    params, grad_rot = params.float().contiguous(), grad_rot.float().contiguous()
    out = torch.empty_like(params)
    grid = (params.shape[0],)
    _rotation_grad_kernel[grid](params, grad_rot, out, B=block_size, TERMS=terms, USE_DOT=block_size >= 16)
    return out

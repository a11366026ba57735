"""OFT math as PEFT >= 0.18 defines it (pure torch): the CPU path and the oracle.

Parameters ``[r, b(b-1)/2]`` hold each block's strict upper triangle in ``triu_indices(b, b, 1)``
order; Q = U - U^T; R by Cayley-Neumann with n terms (n = 1: I; n = 2: I + 2Q; n >= 3:
I + 2 * sum_{k=1..m} Q^k + Q^(m+1), m = max(2, n - 2)) or exactly, (I - Q)(I + Q)^-1. The input is
rotated per block in fp32 (``x_rot[c] = sum_k x[k] R[k, c]``) and rounded back to x's dtype.
"""

from __future__ import annotations

import torch


def skew(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """Q = U - U^T: ``[r, b(b-1)/2] -> [r, b, b]``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-2, -1)


def neumann_coefficients(neumann_terms: int) -> list[float]:
    """c_1..c_K of R = I + sum_k c_k Q^k (Cayley-Neumann with n terms, as ``rotation`` sums them)."""
    if neumann_terms <= 1:
        return []
    if neumann_terms == 2:
        return [2.0]
    m = max(2, neumann_terms - 2)
    return [2.0] * m + [1.0]


def rotation_params_grad(params: torch.Tensor, grad_rot: torch.Tensor, block_size: int, neumann_terms: int):
    """dL/d(params) ``[r, b(b-1)/2]`` of the Cayley-Neumann R from dL/dR ``[r, b, b]``, closed form:
    with P = Q^T, dL/dQ = sum_k c_k T_k, T_1 = G, T_{k+1} = P T_k + G P^k; dL/dU = dQ - dQ^T."""
    g = grad_rot.to(params.dtype)
    p = skew(params, block_size).transpose(-2, -1)
    grad_q = torch.zeros_like(g)
    term, power = g, p
    for k, c in enumerate(neumann_coefficients(neumann_terms), start=1):
        if k > 1:
            term = p @ term + g @ power
            power = power @ p
        grad_q = grad_q + c * term
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    return (grad_q - grad_q.transpose(-2, -1))[:, rows, cols]


def rotation(params: torch.Tensor, block_size: int, neumann_terms: int = 5, use_neumann: bool = True) -> torch.Tensor:
    """R for every block ``[r, b, b]`` (differentiable), in the parameters' dtype."""
    q = skew(params, block_size)
    eye = torch.eye(block_size, device=params.device, dtype=params.dtype).expand_as(q)
    if not use_neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if neumann_terms > 1:
        r = r + 2 * q
        if neumann_terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, neumann_terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


@torch.no_grad()
def coft_project(params: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: each block's Q projected onto the Frobenius ball of radius eps / sqrt(r)."""
    q = skew(params, block_size)
    radius = eps * (1 / torch.sqrt(torch.tensor(params.shape[0])))  # fp32 steps, as PEFT computes them
    norm = torch.norm(q, dim=(1, 2), keepdim=True)
    projected = torch.where(norm <= radius, q, radius * (q / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    return projected[:, rows, cols]


def rotate(x: torch.Tensor, rot: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Rotate the last dimension of ``x`` block by block with ``rot`` [nb, b, b] (or its transposes)
    in fp32, rounded back to x's dtype; float64 stays float64 (gradcheck)."""
    nb, b, _ = rot.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = x.reshape(*x.shape[:-1], nb, b).to(acc)
    r = rot.to(acc).transpose(-2, -1) if transpose else rot.to(acc)
    return torch.einsum("...rk,rkc->...rc", blocks, r).reshape(x.shape).to(x.dtype)


def rotation_grad(x: torch.Tensor, grad_rotated: torch.Tensor, nb: int, b: int) -> torch.Tensor:
    """dL/dR [nb, b, b] from x [M, K] and dL/d(x_rot) [M, K], accumulated in fp32 (or float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xb = x.reshape(-1, nb, b).to(acc)
    gb = grad_rotated.reshape(-1, nb, b).to(acc)
    return torch.einsum("mrk,mrc->rkc", xb, gb)

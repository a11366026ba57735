"""HRA's math (Yuan et al. 2024, Householder reflection adaptation; PEFT's ``HRAConfig``).

PEFT's HRA multiplies the weight by ``H = H_0 H_1 ... H_{r-1}``, ``H_i = I - 2 u_i u_i^T`` (u_i the
normalised columns of ``hra_u`` [in, r]), or with ``apply_GS`` by ``H = I - 2 U U^T`` (U the columns
orthonormalised by Gram-Schmidt): ``W' = W H``, so ``y = (x H^T) W^T + bias``.

qft applies the chain in one step through its compact WY form (Schreiber and Van Loan 1989; the
``T^-1 = diag(1/tau) + striu(U^T U)`` form of Joffrain et al. 2006): ``H = I - U T U^T`` with
``T = (I/2 + striu(U^T U))^-1`` (r x r, upper triangular), and ``T = 2 I`` for Gram-Schmidt. So
``x H^T = x - ((x U) T^T) U^T``: two [M, in] x [in, r]-sized products instead of r sequential
rank-one passes over x, O(M in r) either way; no in x in matrix is formed.

The reflection runs in fp32 (fp64 for fp64 inputs) and rounds to x's dtype; backward keeps x once in
its own dtype.
"""

from __future__ import annotations

import torch

from qft.adapters import accumulation_dtype
from qft.functional import _without_autocast


def units(hra_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """The unit vectors [in, r] H is made of, differentiable in ``hra_u`` (as PEFT's ``get_delta_weight``)."""
    if not apply_gs:
        return hra_u / hra_u.norm(dim=0)
    columns = [hra_u[:, 0] / hra_u[:, 0].norm()]
    for i in range(1, hra_u.shape[1]):
        u = hra_u[:, i]
        for previous in columns:
            u = u - (previous @ u) * previous
        columns.append(u / u.norm())
    return torch.stack(columns, dim=1)


def wy_factor(unit: torch.Tensor, chain: bool) -> torch.Tensor:
    """T [r, r] with ``H = I - U T U^T`` (differentiable in U): the chain's, or 2 I for Gram-Schmidt."""
    eye = torch.eye(unit.shape[1], dtype=unit.dtype, device=unit.device)
    if not chain:
        return 2 * eye
    return torch.linalg.solve_triangular(0.5 * eye + torch.triu(unit.t() @ unit, 1), eye, upper=True)


class _Householder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, unit, t):
        ctx.save_for_backward(x2d if any(ctx.needs_input_grad[1:]) else None, unit, t)
        acc = accumulation_dtype(x2d, unit)
        x, u = x2d.to(acc), unit.to(acc)
        return (x - ((x @ u) @ t.to(acc).t()) @ u.t()).to(x2d.dtype)

    @staticmethod
    @_without_autocast
    def backward(ctx, grad):  # z = x - a T^T U^T with a = x U
        x2d, unit, t = ctx.saved_tensors
        acc = accumulation_dtype(grad, unit)
        u, g, ta = unit.to(acc), grad.to(acc), t.to(acc)
        ct = (g @ u) @ ta
        grad_x = g - ct @ u.t()
        grad_unit = grad_t = None
        if x2d is not None:
            x = x2d.to(acc)
            a = x @ u
            grad_unit = (-(g.t() @ (a @ ta.t())) - x.t() @ ct).to(unit.dtype)
            grad_t = (-((g @ u).t() @ a)).to(t.dtype)
        return grad_x.to(grad.dtype), grad_unit, grad_t


def householder(x: torch.Tensor, hra_u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """``x H^T`` for x [..., in] in x's dtype (HRA's input transform; differentiable in x and ``hra_u``).
    U and T are built, and x reflected, in fp32 (fp64 for fp64 inputs) whatever ``hra_u``'s dtype, also
    under autocast."""
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        unit = units(hra_u.to(accumulation_dtype(hra_u)), apply_gs)
        out = _Householder.apply(x.reshape(-1, x.shape[-1]), unit, wy_factor(unit, not apply_gs))
    return out.view(*lead, x.shape[-1])


def delta_matrix(hra_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """H [in, in] itself (for merging): ``W' = W H``."""
    unit = units(hra_u.to(torch.promote_types(hra_u.dtype, torch.float32)), apply_gs)
    eye = torch.eye(unit.shape[0], dtype=unit.dtype, device=unit.device)
    return eye - unit @ wy_factor(unit, not apply_gs) @ unit.t()
